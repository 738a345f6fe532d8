"""Every figure README.md quotes is one that benchmarks/README.md records (with its command, machine, date)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A measured figure: a number (or range) with a unit of accuracy, speed-up or throughput.
FIGURE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?(?: ?%|x(?![\w])| img/s| images/s)")


def figures(text: str) -> set[str]:
    """The figures in a markdown text, with markup removed and spaces normalised."""
    plain = re.sub(r"[*`]", "", text).replace("\u00a0", " ")
    return {re.sub(r"\s+", " ", m) for m in FIGURE.findall(plain)}


def test_the_pattern_finds_figures_and_ignores_other_numbers():
    assert figures("k-NN **56.8 %** vs 20.2%, 7.2x faster, 2.7-3.0x, 1170 img/s") == {
        "56.8 %",
        "20.2%",
        "7.2x",
        "2.7-3.0x",
        "1170 img/s",
    }
    assert figures("vit_small/16 on 2 cores, 100 epochs, 0x10, v1.2") == set()


def test_readme_figures_are_recorded_in_the_benchmarks():
    readme = figures((ROOT / "README.md").read_text())
    recorded = re.sub(r"\s+", " ", re.sub(r"[*`]", "", (ROOT / "benchmarks" / "README.md").read_text()))
    missing = sorted(f for f in readme if f not in recorded)
    assert readme, "README.md quotes no figure: the pattern is broken"
    assert not missing, f"README.md quotes figures that benchmarks/README.md does not record: {missing}"


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) < 150
