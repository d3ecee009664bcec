"""int8 and fp16 quantisation of embedding tables and of a served model.

Serving picks the variant with ``serve.quantize: none|fp16|int8`` and calls
``quantize(model, mode)``; ``python -m bench.compress`` measures size, retrieval latency and
NDCG@10 of each variant.

- ``int8``: every 2-D float tensor is stored as int8 with one symmetric scale per row
  (``x ≈ q * scale``, ``scale = max|row| / 127``, kept as float16): one byte per value plus
  two per row instead of four per value.
- ``fp16``: every 2-D float tensor is stored as float16: half the size, nearly lossless.
- 1-D float tensors (biases) are stored as float16 in both modes.

Top-K retrieval over an int8 table uses torch's CPU int8-weight GEMM
(``aten._weight_int8pack_mm``, activations in bfloat16) to shortlist candidates, then rescores
the shortlist exactly in fp32 from the int8 rows, so the final order is that of the dequantised
table. The fp16 table is expanded to fp32 once in memory (CPU fp16 GEMMs are slower than fp32
ones here), so fp16 saves storage, not retrieval time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from app.config import ModelArgs
from app.models.base import Recommender, item_columns
from app.models.factory import build_model, restore_model
from app.models.topk import TopK, rank_candidates, top_k

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "fp16", "int8")
_MODE_CODE = {"none": 0, "fp16": 1, "int8": 2}
_MODE_KEY = "_quantize_mode"
_Q = ".q"
_SCALE = ".scale"


class CompressError(ValueError):
    """A model or mode cannot be quantised; the message says why and what to use instead."""


def _check_mode(mode: str) -> str:
    if mode not in QUANTIZE_MODES:
        raise CompressError(
            f"unknown quantize mode {mode!r}; expected one of {', '.join(QUANTIZE_MODES)}"
        )
    return mode


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return t.detach().cpu().float().contiguous()


def quantize_rows(x: np.ndarray | torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """Compress a 2-D float table row by row.

    Returns:
        ``{"q": values}`` (fp32 for ``none``, float16 for ``fp16``, int8 for ``int8``) plus
        ``{"scale": per-row fp32 scales}`` for ``int8``.
    """
    t = _as_tensor(x)
    if t.ndim != 2:
        raise CompressError(f"expected a 2-D table, got shape {tuple(t.shape)}")
    mode = _check_mode(mode)
    if mode == "none":
        return {"q": t.clone()}
    if mode == "fp16":
        return {"q": t.half()}
    scale = t.abs().amax(dim=1) / 127.0
    # All-zero rows keep scale 1 so that dequantisation never divides by zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # fp16 scales (2 bytes a row instead of 4) when they fit; their rounding (2^-11 relative) is
    # far below the int8 step, and the values are quantised with the rounded scale itself.
    half = scale.half()
    if torch.isfinite(half).all() and (half > 0).all():
        scale = half
    q = torch.round(t / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"q": q, "scale": scale}


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of ``quantize_rows``: the fp32 table."""
    out = q.float()
    if scale is not None:
        out = out * scale.float()[:, None]
    return out.contiguous()


def _int8_gemm_available() -> bool:
    try:
        q = torch.ones(8, 32, dtype=torch.int8)
        torch.ops.aten._weight_int8pack_mm(
            torch.ones(1, 32, dtype=torch.bfloat16), q, torch.ones(8, dtype=torch.bfloat16)
        )
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


# torch's int8 kernel crashed the process (SIGSEGV) on an AVX-512 host for some table shapes
# while its probe above passed, so it is opt-in; the fallback dequantizes per block (exact).
_INT8_GEMM = os.environ.get("SCALEREC_INT8_GEMM") == "1" and _int8_gemm_available()


class EmbeddingTable:
    """An (items x dim) table in fp32, fp16 or row-wise int8, with top-K inner-product search.

    Args:
        values: The stored values (fp32, float16 or int8).
        scale: Per-row scales of an int8 table (None otherwise).
        block_rows: Rows scored at once; bounds the temporary memory of a search.
    """

    def __init__(
        self, values: torch.Tensor, scale: torch.Tensor | None = None, block_rows: int = 262_144
    ) -> None:
        if values.dtype == torch.int8:
            if scale is None:
                raise CompressError("an int8 table needs its per-row scales")
            self.mode = "int8"
        else:
            self.mode = "fp16" if values.dtype == torch.float16 else "none"
        self.values = values.contiguous()
        self.stored_scale = scale
        # fp32 working copy of the (usually float16) stored scales.
        self.scale = None if scale is None else scale.float().contiguous()
        self.block_rows = int(block_rows)
        # CPU fp16 GEMMs are slower than fp32 ones: compute with an fp32 copy of the fp16 table.
        self._fp32 = dequantize_rows(values) if self.mode != "int8" else None
        self._scale_bf16 = self.scale.bfloat16() if self.scale is not None else None
        # The CPU int8 kernel needs dim % 8 == 0 (it crashes otherwise): pad a compute copy.
        self._pad = (-self.values.shape[1]) % 8 if self.mode == "int8" else 0
        self._gemm_q = (
            torch.nn.functional.pad(self.values, (0, self._pad)) if self._pad else self.values
        )

    @classmethod
    def from_float(cls, x: np.ndarray | torch.Tensor, mode: str, **kw: Any) -> EmbeddingTable:
        """Quantise an fp32 table (``mode`` one of ``QUANTIZE_MODES``)."""
        parts = quantize_rows(x, mode)
        return cls(parts["q"], parts.get("scale"), **kw)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, dim)."""
        return (int(self.values.shape[0]), int(self.values.shape[1]))

    def nbytes(self) -> int:
        """Bytes of the stored table (values + scales), the size that ships and is cached.

        The fp16 variant also holds an fp32 copy in memory for speed (not counted here).
        """
        n = self.values.numel() * self.values.element_size()
        if self.stored_scale is not None:
            n += self.stored_scale.numel() * self.stored_scale.element_size()
        return int(n)

    def dequantize(self) -> np.ndarray:
        """The table as fp32 (what its scores are exact for)."""
        if self._fp32 is not None:
            return self._fp32.numpy()
        return dequantize_rows(self.values, self.scale).numpy()

    def _block_scores(self, u: torch.Tensor, start: int, stop: int, exact: bool) -> torch.Tensor:
        if self._fp32 is not None:
            return u @ self._fp32[start:stop].T
        assert self.scale is not None and self._scale_bf16 is not None
        q = self._gemm_q[start:stop]
        if self._pad:
            u = torch.nn.functional.pad(u, (0, self._pad))
        if _INT8_GEMM and not exact:
            # Shortlisting only: bf16 activations are what the AVX2 int8 kernel is fast for.
            s = torch.ops.aten._weight_int8pack_mm(u.bfloat16(), q, self._scale_bf16[start:stop])
            return s.float()
        if _INT8_GEMM:
            return torch.ops.aten._weight_int8pack_mm(u, q, self.scale[start:stop])
        return (u @ q.float().T) * self.scale[start:stop][None, :]

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Exact fp32 scores ``queries @ dequantize().T``, shape ``(len(queries), rows)``."""
        u = _as_tensor(queries)
        n = self.shape[0]
        out = torch.empty((len(u), n), dtype=torch.float32)
        with torch.no_grad():
            for start in range(0, n, self.block_rows):
                stop = min(start + self.block_rows, n)
                out[:, start:stop] = self._block_scores(u, start, stop, exact=True)
        return out.numpy()

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        if self._fp32 is not None:
            return self._fp32[idx]
        assert self.scale is not None
        return self.values[idx].float() * self.scale[idx][..., None]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """The fp32 vectors of rows ``idx`` (what ``dequantize`` holds there), ``(len(idx), d)``."""
        return self._rows(torch.as_tensor(idx, dtype=torch.int64)).numpy()

    def _rescore(self, u: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Exact fp32 scores of candidate rows ``cand`` (b, c) for queries ``u`` (b, d)."""
        return torch.einsum("bcd,bd->bc", self._rows(cand), u)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: sp.csr_matrix | None = None,
        oversample: int = 4,
    ) -> TopK:
        """Top-``k`` rows by inner product for each query, best first.

        Ranked by ``app.models.topk``'s rule (ties to the lower row index), block by block.
        Excluded rows are never returned; slots without a candidate hold index ``-1`` and
        score ``-inf``.

        Args:
            queries: ``(b, dim)`` query vectors.
            k: List length.
            exclude: ``(b, rows)`` matrix whose non-zero entries are excluded, or None.
            oversample: int8 only: shortlist ``oversample * k + 16`` rows with the fast int8
                kernel, then rescore them exactly.

        Returns:
            ``(b, k)`` int64 indices and ``(b, k)`` float32 scores.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        u = _as_tensor(queries)
        b, n = len(u), self.shape[0]
        exact = self.mode != "int8"
        keep = min(k, n) if exact else min(n, max(k, oversample * k + 16))
        ex = None
        if exclude is not None:
            ex = sp.csr_matrix(exclude)
            if ex.shape != (b, n):
                raise ValueError(f"exclude has shape {ex.shape}, expected {(b, n)}")
        parts_i, parts_s = [], []
        with torch.no_grad():
            for start in range(0, n, self.block_rows):
                stop = min(start + self.block_rows, n)
                s = self._block_scores(u, start, stop, exact=exact)
                block = top_k(s, None if ex is None else ex[:, start:stop], keep, overwrite=True)
                parts_i.append(np.where(block.indices >= 0, block.indices + start, -1))
                parts_s.append(block.scores)
            cand_i, cand_s = np.hstack(parts_i), np.hstack(parts_s)
            if exact:
                return rank_candidates(cand_i, cand_s, k)
            # The shortlist comes from approximate scores: rank it by its exact fp32 scores.
            short = rank_candidates(cand_i, cand_s, keep).indices
            rescored = self._rescore(u, torch.from_numpy(np.maximum(short, 0))).numpy()
            return rank_candidates(short, rescored, k)


def _compress_state(state: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {_MODE_KEY: torch.tensor([_MODE_CODE[mode]], dtype=torch.int8)}
    for key, value in state.items():
        v = value.detach().cpu()
        if mode != "none" and v.is_floating_point() and v.ndim == 2:
            parts = quantize_rows(v, mode)
            out[key + _Q] = parts["q"]
            if "scale" in parts:
                out[key + _SCALE] = parts["scale"]
        elif mode != "none" and v.is_floating_point() and v.ndim == 1:
            # Biases: float16 in both modes (per-element int8 scales would save nothing).
            out[key + _Q] = v.half()
        else:
            out[key] = v.clone()
    return out


def _expand_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == _MODE_KEY or key.endswith(_SCALE):
            continue
        if key.endswith(_Q):
            name = key[: -len(_Q)]
            out[name] = dequantize_rows(value, state.get(name + _SCALE))
        else:
            out[key] = value
    return out


class QuantizedRecommender(Recommender):
    """A fitted embedding model whose weights and item table are stored in fp16 or int8.

    The wrapped model's 2-D weights are replaced by their quantise-dequantise round trip (so the
    user tower sees exactly what the registry stores), and its item vectors are kept as an
    ``EmbeddingTable`` of the same mode for ``score`` and ``search``. ``state_dict`` holds only
    the compressed tensors (int8 / float16 values, fp32 row scales, and untouched 1-D tensors).

    Args:
        base: A fitted model with ``item_embeddings()`` (MF, two-tower).
        mode: ``fp16`` or ``int8`` (``none`` keeps fp32 and is only useful for comparisons).
    """

    family = "quantized"

    def __init__(self, base: Recommender, mode: str) -> None:
        mode = _check_mode(mode)
        if base.item_embeddings() is None:
            raise CompressError(
                f"model family {base.family!r} has no embedding tables to quantise; serve it with "
                "serve.quantize=none (quantize() passes such models through only for 'none')"
            )
        super().__init__(base.n_users, base.n_items)
        self.mode = mode
        self.base_family = base.family
        self._base_hparams = base.hparams()
        self._set_state(_compress_state(base.state_dict(), mode))

    def _set_state(self, compressed: dict[str, torch.Tensor]) -> None:
        self._state = compressed
        self.base = restore_model(
            self.base_family,
            self.n_users,
            self.n_items,
            self._base_hparams,
            _expand_state(compressed),
        )
        items = self.base.item_embeddings()
        assert items is not None
        self.table = EmbeddingTable.from_float(items, self.mode)

    def fit(self, train: sp.csr_matrix, **options: Any) -> QuantizedRecommender:
        """Fit the wrapped fp32 model (from its current weights), then compress it again."""
        self.base.fit(train, **options)
        self._base_hparams = self.base.hparams()
        self._set_state(_compress_state(self.base.state_dict(), self.mode))
        return self

    def score(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:  # noqa: D102
        return self.table.scores(self.user_embeddings(users, history))

    def search(
        self, users: np.ndarray, history: sp.csr_matrix, k: int, exclude_history: bool = True
    ) -> TopK:
        """Top-``k`` item indices and scores per user, best first (history excluded by default)."""
        u = self.user_embeddings(users, history)
        exclude = item_columns(history, self.n_items) if exclude_history else None
        return self.table.search(u, k, exclude)

    def item_embeddings(self) -> np.ndarray:  # noqa: D102
        return self.table.dequantize()

    def weigh_history(self, ranks: sp.csr_matrix) -> sp.csr_matrix:  # noqa: D102
        return self.base.weigh_history(ranks)

    def history(self, dataset: Any, *splits: str) -> sp.csr_matrix:  # noqa: D102
        return self.base.history(dataset, *splits)

    def user_embeddings(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:  # noqa: D102
        u = self.base.user_embeddings(users, history)
        assert u is not None
        return u

    def state_dict(self) -> dict[str, torch.Tensor]:  # noqa: D102
        return {k: v.clone() for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # noqa: D102
        code = int(state[_MODE_KEY][0]) if _MODE_KEY in state else None
        if code is not None and code != _MODE_CODE[self.mode]:
            stored = {v: k for k, v in _MODE_CODE.items()}.get(code, str(code))
            raise CompressError(f"state was quantised as {stored!r}, this model is {self.mode!r}")
        self._set_state({k: v.detach().cpu() for k, v in state.items()})

    def hparams(self) -> dict[str, Any]:  # noqa: D102
        return {"quantize": self.mode, "base_family": self.base_family, **self._base_hparams}

    def nbytes(self) -> int:
        """Bytes of the stored (compressed) weights."""
        return state_nbytes(self._state)


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    """Total tensor bytes of a state dict (the size of a model in the registry, minus framing)."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def quantize(model: Recommender, mode: str) -> Recommender:
    """Return ``model`` compressed as ``mode`` (``serve.quantize``).

    ``none`` returns the model itself. Models without embedding tables (popularity, EASE) are
    passed through unchanged for ``none`` and raise ``CompressError`` otherwise.
    """
    mode = _check_mode(mode)
    if mode == "none":
        return model
    if isinstance(model, QuantizedRecommender):
        if model.mode == mode:
            return model
        raise CompressError(f"model is already quantised as {model.mode!r}; start from fp32")
    return QuantizedRecommender(model, mode)


def quantized_builder(mode: str) -> Callable[..., Recommender]:
    """A registry ``load_model`` builder for versions registered as ``QuantizedRecommender``.

    ``load_model(lake, name, ref, builder=quantized_builder("int8"))`` builds the fp32 model the
    config describes, wraps it, and the registry then loads the stored compressed state into it.
    """
    mode = _check_mode(mode)

    def build(args: ModelArgs, n_users: int, n_items: int, **kw: Any) -> Recommender:
        return QuantizedRecommender(build_model(args, n_users, n_items, **kw), mode)

    return build
