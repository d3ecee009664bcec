"""The report's HTML: escaped tables, inline images and the page around them.

Used by ``app.monitoring.report`` (``python -m jobs.report``). Every value is escaped here, so
the report passes lake contents (model names, quarantine reasons, errors) as they are.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np


def escape(value: Any) -> str:
    """``value`` as HTML text."""
    return html.escape(str(value))


def fmt(value: Any) -> str:
    """A cell value: ints with separators, floats to 4 decimals (tiny ones in 3 digits)."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        v = float(value)
        if v and abs(v) < 1e-3:  # learning rates, L2 weights
            return f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"
    return str(value)


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table with a header row."""
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def pairs(rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column table of ``(name, value)`` rows."""
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(fmt(v))}</td></tr>" for k, v in rows)
    return f"<table class='pairs'><tbody>{body}</tbody></table>"


def img(uri: str, alt: str) -> str:
    """An inline image (a ``data:`` URI) with its caption."""
    caption = f"<figcaption>{escape(alt)}</figcaption>"
    return f"<figure><img src='{uri}' alt='{escape(alt)}'>{caption}</figure>"


def missing(text: str) -> str:
    """A highlighted note: what a section lacks and what to run."""
    return f"<p class='missing'>{escape(text)}</p>"


def para(text: str) -> str:
    """A paragraph of text."""
    return f"<p>{escape(text)}</p>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:60rem;color:#222}
h1{margin-bottom:0}h2{border-bottom:1px solid #ccc;margin-top:2.5rem}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}
td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:left}
thead th{background:#f3f3f3}table.pairs th{background:#fafafa;font-weight:500}
figure{margin:1rem 0}img{max-width:100%}figcaption{color:#666;font-size:.85rem}
.missing{background:#fff6e0;border-left:4px solid #e0a800;padding:.5rem .8rem}
"""
# Marks the body when every image decoded, so a headless browser can check the page.
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
  document.body.setAttribute("data-images-ok", String(ok === imgs.length));
});
"""


def render(title: str, subtitle: str, sections: Sequence[tuple[str, str]]) -> str:
    """The whole page: ``sections`` are ``(heading, HTML body)``."""
    toc = "".join(f"<li><a href='#s{i}'>{escape(h)}</a></li>" for i, (h, _) in enumerate(sections))
    body = "".join(f"<h2 id='s{i}'>{escape(h)}</h2>{b}" for i, (h, b) in enumerate(sections))
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>"
        f"<body><h1>{escape(title)}</h1><p>{escape(subtitle)}</p><ul>{toc}</ul>{body}</body></html>"
    )
