"""The ``dino`` command's skeleton: version, help, exit codes, one-line errors, ``--debug``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib import metadata

import pytest
import torch

import dinocli
import dinocli.cli.plugins as plugins_cli
from dinocli.cli import app
from dinocli.cli.app import DEBUG_ENV
from dinocli.errors import DinoError, UsageError


def test_version(run_dino):
    result = run_dino("--version")
    assert result.returncode == 0
    assert result.stdout == f"dinocli {metadata.version('dinocli')}\n"
    assert dinocli.__version__ == metadata.version("dinocli")
    module = subprocess.run(
        [sys.executable, "-m", "dinocli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert (module.returncode, module.stdout) == (0, result.stdout)


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(cli, flag):
    result = cli.invoke(app, [flag], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    for text in ("Usage: dino", "--version", "--debug", "plugins", "Inspect"):
        assert text in result.stdout
    sub = cli.invoke(app, ["plugins", flag], env={"COLUMNS": "120"})
    assert sub.exit_code == 0 and "--json" in sub.stdout


def test_no_arguments_shows_help(run_dino):
    result = run_dino()
    assert "Usage: dino" in result.stdout and "plugins" in result.stdout
    assert result.stderr == ""
    assert result.returncode == 2  # no command given: a usage error, with the help as the message


@pytest.mark.parametrize(
    "args, message",
    [
        (["plugins", "--bogus"], "error: No such option: --bogus (see 'dino plugins --help')"),
        (["bogus-command"], "error: No such command 'bogus-command'. (see 'dino --help')"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(run_dino, args, message):
    result = run_dino(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [message]


def fail_with(monkeypatch, exc: BaseException) -> None:
    def raise_it():
        raise exc

    monkeypatch.setattr(plugins_cli, "get_registry", raise_it)
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored after the test, whatever --debug sets


@pytest.mark.parametrize(
    "exc, code, line",
    [
        (UsageError("no such folder:\n  /data"), 2, "error: no such folder: /data"),
        (DinoError("the disk is full"), 1, "error: the disk is full"),
        (RuntimeError("kaboom"), 1, "error: RuntimeError: kaboom (run with --debug for the traceback)"),
        (KeyboardInterrupt(), 130, "error: interrupted"),
    ],
    ids=["usage", "runtime", "unexpected", "ctrl-c"],
)
def test_command_errors_become_one_line_and_an_exit_code(cli, monkeypatch, exc, code, line):
    fail_with(monkeypatch, exc)
    result = cli.invoke(app, ["plugins"])
    assert result.exit_code == code
    assert result.stderr.splitlines() == [line]
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(cli, monkeypatch):
    fail_with(monkeypatch, DinoError("the disk is full"))
    result = cli.invoke(app, ["--debug", "plugins"])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "dinocli.errors.DinoError: the disk is full" in lines
    assert lines[-1] == "error: the disk is full"


class _FailingImages(torch.utils.data.Dataset):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise self.exc


def worker_failure(exc: BaseException) -> BaseException:
    """``exc`` as PyTorch re-raises it from a data-loading worker: the worker's traceback in its message."""
    loader = torch.utils.data.DataLoader(_FailingImages(exc), num_workers=1)
    with pytest.raises(type(exc)) as caught:
        next(iter(loader))
    assert "Original Traceback (most recent call last)" in str(caught.value)
    return caught.value


@pytest.mark.parametrize(
    "exc, code, line",
    [
        (TypeError("expected Tensor as element 0, got JpegImageFile"), 1,
         "error: TypeError: expected Tensor as element 0, got JpegImageFile (in DataLoader worker process 0) "
         "(run with --debug for the traceback)"),
        (UsageError("cannot decode image a.jpg: truncated"), 2, "error: cannot decode image a.jpg: truncated"),
    ],
    ids=["unexpected", "dinocli"],
)
def test_an_error_in_a_data_loading_worker_is_its_own_line_not_its_traceback(cli, monkeypatch, exc, code, line):
    fail_with(monkeypatch, worker_failure(exc))
    result = cli.invoke(app, ["plugins"])
    assert result.exit_code == code
    assert result.stderr.splitlines() == [line]


def test_debug_does_not_ask_for_debug(cli, monkeypatch):
    fail_with(monkeypatch, RuntimeError("kaboom"))
    result = cli.invoke(app, ["--debug", "plugins"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "error: RuntimeError: kaboom"


SCRIPT = textwrap.dedent(
    """
    import sys
    import dinocli.cli.plugins as plugins_cli
    from dinocli.cli import main
    from dinocli.errors import UsageError

    def broken():
        raise UsageError("cannot read the registry")

    plugins_cli.get_registry = broken
    main(sys.argv[1:])
    """
)


@pytest.mark.parametrize("debug", [False, True])
def test_console_entry_point_exit_codes(debug):
    """``dinocli.cli:main`` (the console script) in a real process: exit code and stderr."""
    args = ["--debug", "plugins"] if debug else ["plugins"]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[-1] == "error: cannot read the registry"
    if debug:
        assert lines[0] == "Traceback (most recent call last):" and len(lines) > 3
    else:
        assert lines == ["error: cannot read the registry"]
