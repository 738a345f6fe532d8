"""The report's HTML page: self-contained (inline CSS, images embedded), links to the PNG files."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } p.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 1em 0; } td, th { padding: 0.2em 0.8em; text-align: left; }
th { color: #555; font-weight: normal; } td { font-variant-numeric: tabular-nums; }
.warn { color: #b00020; } .grid { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; border: 1px solid #ddd; border-radius: 4px; padding: 4px; }
figure img { display: block; width: 640px; max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; padding: 0.3em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""


@dataclass
class Figure:
    """One chart on the page: the PNG file's name, its bytes and a caption."""

    filename: str
    png: bytes
    caption: str


def html_page(title: str, subtitle: str, summary: list[tuple[str, str]], warnings: list[str],
              figures: list[Figure], config_text: str = "") -> str:
    """The whole page as a string; every image is embedded as a data URI and links to its file."""
    e = html.escape
    rows = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in summary)
    warn = "".join(f'<p class="warn">{e(w)}</p>\n' for w in warnings)
    figs = "\n".join(
        f'<figure><a href="{e(f.filename)}"><img alt="{e(f.caption)}" '
        f'src="data:image/png;base64,{base64.b64encode(f.png).decode("ascii")}"></a>'
        f"<figcaption>{e(f.caption)} (<a href=\"{e(f.filename)}\">{e(f.filename)}</a>)</figcaption></figure>"
        for f in figures
    )
    config = (
        f"<details><summary>config.toml</summary><pre>{e(config_text)}</pre></details>" if config_text else ""
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>\n"
        f"<h1>{e(title)}</h1><p class=\"sub\">{e(subtitle)}</p>\n{warn}"
        f"<table>{rows}</table>\n<div class=\"grid\">\n{figs}\n</div>\n{config}\n</body></html>\n"
    )


__all__ = ["Figure", "html_page"]
