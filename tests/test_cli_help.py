"""Every command's --help ends with examples, and every option an example uses exists."""

from __future__ import annotations

import re
import shlex

import pytest
import typer.main
from typer.testing import CliRunner

from dinocli.cli import app

CLICK = typer.main.get_command(app)
EXAMPLE = re.compile(r"\[bold\]\$\[/bold\] (.+)")


def _examples(epilog: str | None) -> list[list[str]]:
    return [shlex.split(m) for m in EXAMPLE.findall(epilog or "")]


def _check(example: list[str]) -> None:
    assert example[0] == "dino", example
    command = CLICK.commands[example[1]]  # KeyError: the example names no command
    known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    used = {word.split("=")[0] for word in example[2:] if word.startswith("-")}
    assert used <= known, f"{' '.join(example)}: unknown options {sorted(used - known)}"


@pytest.mark.parametrize("name", sorted(CLICK.commands))
def test_every_command_has_valid_examples(name):
    command = CLICK.commands[name]
    examples = _examples(command.epilog)
    assert examples, f"dino {name} --help has no example"
    assert command.short_help and len(command.short_help) <= 90
    for example in examples:
        assert example[1] == name
        _check(example)


def test_root_help_examples_use_real_commands_and_options():
    examples = _examples(CLICK.epilog)
    assert len(examples) >= 4
    for example in examples:
        _check(example)


def test_help_shows_examples_and_panels_in_order():
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "120"}).output
    panels = [p for p in ("Train", "Evaluate", "Inspect", "Models") if f"─ {p} " in out]
    assert panels == ["Train", "Evaluate", "Inspect", "Models"]
    assert out.index("─ Train ") < out.index("─ Evaluate ") < out.index("─ Inspect ") < out.index("─ Models ")
    assert "$ dino demo" in out
    knn = CliRunner().invoke(app, ["knn", "--help"], env={"COLUMNS": "120"}).output
    assert "Examples" in knn and "$ dino knn --train train.safetensors" in knn
