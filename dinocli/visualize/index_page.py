"""A self-contained HTML page listing pictures: inline CSS, relative links, no external assets."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from dinocli.io import atomic_write_text


@dataclass
class IndexEntry:
    """One picture on the page: its heading, the image path relative to the page, and a caption."""

    name: str
    image: str
    caption: str = ""


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
h1 { font-size: 1.4rem; margin-bottom: .2rem; }
p.meta { color: #555; margin-top: 0; }
section { margin: 1.5rem 0; padding-top: .5rem; border-top: 1px solid #ddd; }
h2 { font-size: 1.05rem; margin: .3rem 0; }
img { max-width: 100%; height: auto; border: 1px solid #ccc; }
figcaption { color: #555; font-size: .9rem; }
nav a { margin-right: .8rem; }
"""


def render_index_html(title: str, entries: Sequence[IndexEntry], description: str = "") -> str:
    """The HTML text of a page showing every entry's image under its name."""
    esc = html.escape
    links = " ".join(f'<a href="#{_anchor(i)}">{esc(e.name)}</a>' for i, e in enumerate(entries))
    sections = "\n".join(
        f'<section id="{_anchor(i)}">\n<h2>{esc(e.name)}</h2>\n<figure>\n'
        f'<a href="{esc(_url(e.image))}"><img src="{esc(_url(e.image))}" alt="{esc(e.name)}" '
        f'loading="lazy"></a>\n'
        + (f"<figcaption>{esc(e.caption)}</figcaption>\n" if e.caption else "")
        + "</figure>\n</section>"
        for i, e in enumerate(entries)
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n"
        + (f'<p class="meta">{esc(description)}</p>\n' if description else "")
        + f"<nav>{links}</nav>\n{sections}\n</body>\n</html>\n"
    )


def write_index_html(
    path: str | Path, title: str, entries: Sequence[IndexEntry], description: str = ""
) -> Path:
    """Write :func:`render_index_html` to ``path`` atomically; returns ``path``."""
    atomic_write_text(path, render_index_html(title, entries, description))
    return Path(path)


def _url(relative: str) -> str:
    return quote(Path(relative).as_posix(), safe="/")


def _anchor(i: int) -> str:
    return f"image-{i}"
