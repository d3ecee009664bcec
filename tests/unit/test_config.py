from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import AppConfig, ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[2]
JOB_CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))


def test_ships_the_documented_configs():
    names = {p.name for p in JOB_CONFIGS}
    assert {"synthetic.yaml", "ml-latest-small.yaml"} <= names


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, AppConfig)
    assert cfg.data.name


def test_dotted_overrides_are_typed():
    cfg = load_config(
        ROOT / "jobs/configs/synthetic.yaml",
        ["train.lr=3e-4", "train.num_workers=4", "lake=/tmp/x", "data.synthetic.n_users=7"],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.num_workers == 4
    assert cfg.lake == "/tmp/x"
    assert cfg.data.synthetic.n_users == 7


def test_model_shorthand_sets_the_version():
    cfg = load_config(ROOT / "jobs/configs/synthetic.yaml", ["model=production"])
    assert cfg.model.version == "production"
    assert cfg.model.name == "mf"


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_config(ROOT / "jobs/configs/synthetic.yaml", ["train.learning_rate=0.1"])


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.num_workers"):
        load_config(None, ["train.num_workers=-1"])
    with pytest.raises(ConfigError, match=r"data\.format"):
        load_config(None, ["data.format=xml"])


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  source: synthetic\n  colums: {}\n")
    with pytest.raises(ConfigError, match=r"data\.colums: unknown key") as err:
        load_config(p)
    assert str(p) in str(err.value)


def test_path_required_for_file_sources():
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        load_config(None, ["data.source=files"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(ConfigError, match=r"lake: Input should be a valid string"):
        load_config(None, ["lake.x=1"])
    with pytest.raises(ConfigError, match="lake is not a section"):
        load_config(ROOT / "jobs/configs/synthetic.yaml", ["lake.x=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(ValidationError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_relative_paths_resolve_where_the_config_is_loaded(tmp_path, monkeypatch):
    from app.serve.args import ServeAppArgs

    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(
        "lake: ./lake\n"
        "data: {source: files, path: raw, item_features: raw/movies.csv}\n"
        "serve: {config: confs/local.yaml}\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_file)
    assert cfg.lake == str(tmp_path / "lake")
    assert cfg.data.path == str(tmp_path / "raw")
    assert cfg.data.item_features == str(tmp_path / "raw" / "movies.csv")
    assert cfg.serve.config == str(tmp_path / "confs" / "local.yaml")
    # the stages get what the config holds: serving, and Ray workers re-validating a dump
    assert ServeAppArgs.from_config(cfg).lake == str(tmp_path / "lake")
    monkeypatch.chdir("/")
    assert AppConfig.model_validate(cfg.model_dump()).lake == str(tmp_path / "lake")
    # the default lake too, and URIs stay as they are
    monkeypatch.chdir(tmp_path)
    assert AppConfig().lake == str(tmp_path / "lake")
    assert load_config(None, ["lake=s3://bucket/lake"]).lake == "s3://bucket/lake"
    assert ServeAppArgs().lake == str(tmp_path / "lake")


def test_relative_lake_inside_a_ray_job_working_copy_is_refused(tmp_path, monkeypatch):
    from app.serve.args import ServeAppArgs

    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with pytest.raises(ConfigError, match=r"lake: .*relative.*lake=s3://bucket/lake"):
        load_config(ROOT / "jobs/configs/synthetic.yaml")
    with pytest.raises(ValidationError, match="absolute path"):
        ServeAppArgs(lake="lake")
    assert load_config(None, ["lake=/srv/lake"]).lake == "/srv/lake"
    assert load_config(None, ["lake=s3://b/lake"]).lake == "s3://b/lake"
    # inputs shipped with the job's working directory are read from the copy
    cfg = load_config(None, ["lake=/srv/lake", "data.source=files", "data.path=data"])
    assert cfg.data.path == str(copy / "data")
