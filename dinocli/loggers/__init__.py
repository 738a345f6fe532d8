"""Where a training run's metrics go: the ``loggers`` plugin kind (``--logger jsonl,tensorboard``).

Each record a run writes (every ``--log-every`` iterations, each epoch's summary, each k-NN
evaluation) goes to every chosen logger. Only the main process creates loggers. A logger that
raises while logging is reported once and dropped; training goes on with the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dinocli.errors import DinoError, UsageError
from dinocli.interfaces import Logger

#: Keys of a record that say where it belongs rather than what was measured.
INDEX_KEYS = ("iteration", "summary", "time")


def parse_logger_names(value: str | Iterable[str]) -> list[str]:
    """``"jsonl, tensorboard"`` (or a list) -> ``["jsonl", "tensorboard"]``, without repeats."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = [p.strip() for p in parts if p.strip()]
    if not names:
        raise UsageError("--logger needs at least one logger name (e.g. jsonl)")
    return list(dict.fromkeys(names))


def scalars(record: dict[str, Any]) -> tuple[str, int, dict[str, float]]:
    """A record as (group, step, finite numbers): group ``train``, ``epoch`` or ``knn``, step the iteration."""
    group = record.get("summary") or "train"
    step = int(record.get("iteration", 0))
    values = {
        key: float(value)
        for key, value in record.items()
        if key not in INDEX_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value)
    }
    return group, step, values


class Loggers:
    """Fans each record out to several loggers; a failing logger is reported once and dropped."""

    def __init__(self, loggers: dict[str, Logger], warn: Callable[[str], None]) -> None:
        self.loggers = dict(loggers)
        self._warn = warn

    def write(self, record: dict[str, Any]) -> None:
        for name in list(self.loggers):
            self._call(name, "log", record)

    def rewind(self, iteration: int) -> None:
        """Forget what was logged after ``iteration`` (a resumed run repeats those iterations)."""
        for name in list(self.loggers):
            if hasattr(self.loggers[name], "rewind"):
                self._call(name, "rewind", iteration)

    def close(self) -> None:
        for name in list(self.loggers):
            self._call(name, "close")
        self.loggers.clear()

    def _call(self, name: str, method: str, *args: Any) -> None:
        try:
            getattr(self.loggers[name], method)(*args)
        except Exception as exc:  # noqa: BLE001 - a metrics sink must never stop training
            del self.loggers[name]
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._warn(f"warning: logger {name!r} failed ({type(exc).__name__}: {reason}); it is disabled for this run")


def open_loggers(
    names: str | Iterable[str],
    output: Path,
    config: dict[str, Any],
    warn: Callable[[str], None],
    enabled: bool = True,
) -> Loggers:
    """The chosen loggers for the run folder ``output`` (none where ``enabled`` is false: other ranks).

    An unknown name or a logger whose library is missing is a :class:`UsageError` before training
    starts; any other failure to start a logger is reported and training goes on without it.
    """
    from dinocli.registry import get_registry

    chosen = parse_logger_names(names)
    registry = get_registry()
    for name in chosen:
        registry.get("loggers", name)  # the registry's one-line error for an unknown name
    loggers: dict[str, Logger] = {}
    if enabled:
        for name in chosen:
            try:
                loggers[name] = registry.create(
                    "loggers", name, output=Path(output), run_name=Path(output).name, config=config
                )
            except UsageError:
                Loggers(loggers, warn).close()  # no run left open by the loggers started before
                raise
            except DinoError as exc:
                warn(f"warning: {exc}; training goes on without it")
                continue
            missing = [m for m in ("log", "close") if not callable(getattr(loggers[name], m, None))]
            if missing:  # said now, not when the first record (or the run's end) reaches it
                del loggers[name]
                warn(
                    f"warning: {registry.describe('loggers', name)} is broken: it has no "
                    f"{' and no '.join(f'{m}()' for m in missing)} method; training goes on without it"
                )
    return Loggers(loggers, warn)


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise a one-line :class:`UsageError` naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(
            f"logger {extra!r} needs the {module.split('.')[0]} package: pip install 'dinocli[{extra}]'"
        ) from None
