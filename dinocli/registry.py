"""The plugin registry: entry points in the group ``dinocli``, loaded through pluggy.

Each plugin is loaded and asked to register on its own, so a plugin that fails to import, uses a
misspelled hook or raises while registering is reported once and listed with its error, while
everything else keeps working. Set ``DINOCLI_PLUGINS`` to restrict external plugins: ``none``
(built-ins only) or a comma-separated list of entry-point names to allow.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from typing import Any

import pluggy

from dinocli import hookspecs
from dinocli.errors import DinoError, UsageError, debug_enabled, unknown_name

ENV_VAR = "DINOCLI_PLUGINS"

#: Plugin kinds: key -> (hook name, singular, plural).
KINDS = {
    "backbones": ("dinocli_register_backbones", "backbone", "backbones"),
    "augmentations": ("dinocli_register_augmentations", "augmentation", "augmentations"),
    "collapse_strategies": (
        "dinocli_register_collapse_strategies",
        "collapse strategy",
        "collapse strategies",
    ),
    "recipes": ("dinocli_register_recipes", "recipe", "recipes"),
    "loggers": ("dinocli_register_loggers", "logger", "loggers"),
}


@dataclass(frozen=True)
class Entry:
    """One registered thing: its name, factory and the plugin that registered it."""

    name: str
    factory: Callable[..., Any]
    plugin: str
    description: str = ""


@dataclass(eq=False)
class Family:
    """Names registered by a pattern ending in ``*`` (``timm/*``): the factory is called with the part
    of the name after the prefix, and ``members()`` (the list of those parts) is called only when a
    name of the family is looked up, completed or counted, so listing the pattern imports nothing."""

    pattern: str
    factory: Callable[..., Any]
    members: Callable[[], Iterable[str]]
    plugin: str
    description: str = ""
    _names: list[str] | None = field(default=None, repr=False)

    @property
    def prefix(self) -> str:
        return self.pattern[:-1]

    def names(self) -> list[str]:
        """The full names (prefix included), sorted; computed once."""
        if self._names is None:
            try:
                self._names = sorted(self.prefix + str(m) for m in self.members())
            except Exception as exc:  # noqa: BLE001 - the plugin's own listing failed
                raise DinoError(
                    f"plugin {self.plugin!r} cannot list the names of {self.pattern!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        return self._names


@dataclass
class PluginInfo:
    """What ``dino plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    builtin: bool
    provides: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    error: str | None = None


class Registry:
    """Every plugin kind's entries by name (see :data:`KINDS`), and the plugins behind them."""

    def __init__(self) -> None:
        self.plugins: dict[str, PluginInfo] = {}
        #: Entry points not loaded because a plugin of their name was loaded first (shown by ``dino plugins``).
        self.ignored: list[PluginInfo] = []
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._families: dict[str, dict[str, Family]] = {kind: {} for kind in KINDS}
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)

    # -- loading ---------------------------------------------------------------------------

    def load_entry_points(self, entry_points: list[metadata.EntryPoint] | None = None) -> None:
        """Load and register every plugin named by an entry point in the group ``dinocli``.

        What plugins print while they load goes to stderr, so that stdout stays the command's own
        (``dino plugins --json``)."""
        if entry_points is None:
            entry_points = list(metadata.entry_points(group=hookspecs.PROJECT))
        allowed = _allowed_external()
        if unknown := sorted((allowed or set()) - {ep.name for ep in entry_points}):
            external = sorted({ep.name for ep in entry_points if not _is_builtin(ep)})
            print(
                f"dinocli: {ENV_VAR} names {', '.join(map(repr, unknown))}, which no installed plugin is "
                f"(installed: {', '.join(external) or 'none'})",
                file=sys.stderr,
            )
        for ep in sorted(entry_points, key=lambda e: (not _is_builtin(e), e.name)):
            builtin = _is_builtin(ep)
            if not builtin and allowed is not None and ep.name not in allowed:
                continue
            dist = ep.dist
            info = PluginInfo(
                name=ep.name,
                distribution=dist.name if dist else "?",
                version=dist.version if dist else "?",
                builtin=builtin,
            )
            if ep.name in self.plugins:
                first = self.plugins[ep.name]
                print(
                    f"dinocli: plugin {ep.name!r} from {info.distribution} ignored: a plugin of "
                    f"that name was already loaded from {first.distribution}",
                    file=sys.stderr,
                )
                info.error = f"not loaded: the name is taken by {first.distribution}"
                self.ignored.append(info)
                continue
            with contextlib.redirect_stdout(sys.stderr):
                try:
                    module = ep.load()
                except (Exception, SystemExit) as exc:  # noqa: BLE001 - isolate any plugin failure
                    self._fail(info, f"failed to import {ep.value}: {type(exc).__name__}: {exc}", exc)
                    continue
                self.add_plugin(module, info)

    def add_plugin(self, module: object, info: PluginInfo) -> None:
        """Register one plugin object (a module or any object with hook implementations)."""
        if info.name in self.plugins:
            raise DinoError(f"two plugins are named {info.name!r}")
        self.plugins[info.name] = info
        try:
            self._pm.register(module, name=info.name)
            self._pm.check_pending()
        except Exception as exc:  # noqa: BLE001 - includes pluggy.PluginValidationError
            if self._pm.is_registered(module):
                self._pm.unregister(module)
            self._fail(info, _hook_problem(exc), exc)
            return
        for kind, (hook_name, *_) in KINDS.items():
            impls = [i for i in getattr(self._pm.hook, hook_name).get_hookimpls() if i.plugin_name == info.name]
            if not impls and callable(getattr(module, hook_name, None)):
                problem = f"{hook_name} is not marked with @dinocli.hookimpl, so it is not called"
                print(f"dinocli: plugin {info.name!r}: {problem}", file=sys.stderr)
                info.error = info.error or problem  # shown by `dino plugins`; the plugin's other hooks still run
            for impl in impls:
                try:
                    impl.function(register=self._register_callback(kind, info))
                except DinoError as exc:
                    self._fail(info, str(exc), exc)
                    return  # a disabled plugin's other hooks are not run
                except (Exception, SystemExit) as exc:  # noqa: BLE001
                    self._fail(info, f"{hook_name} raised {type(exc).__name__}: {exc}", exc)
                    return

    def _register_callback(self, kind: str, info: PluginInfo) -> Callable[..., None]:
        kind_name = KINDS[kind][1]

        def register(
            name: str,
            factory: Callable[..., Any],
            description: str = "",
            names: Callable[[], Iterable[str]] | None = None,
        ) -> None:
            if not isinstance(name, str) or not name:
                raise DinoError(f"plugin {info.name!r} registered a {kind_name} without a name")
            if "," in name or name != "".join(name.split()):
                raise DinoError(
                    f"plugin {info.name!r} registered {kind_name} {name!r}: a name cannot hold commas "
                    "or spaces (--collapse and --logger take comma-separated names)"
                )
            if not callable(factory):
                raise DinoError(
                    f"plugin {info.name!r} registered {kind_name} {name!r} with a factory "
                    f"that is not callable"
                )
            is_pattern = name.endswith("*")
            if is_pattern != callable(names) or "*" in name[:-1] or name == "*":
                raise DinoError(
                    f"plugin {info.name!r} registered {kind_name} {name!r}: a pattern is a prefix "
                    "followed by one '*' and needs names=<callable>, a plain name takes no names="
                )
            existing = (self._families if is_pattern else self._entries)[kind].get(name)
            if existing is not None:
                raise DinoError(
                    f"{kind_name} {name!r} is registered twice: by plugin {existing.plugin!r} "
                    f"and by plugin {info.name!r}"
                )
            if is_pattern:
                self._families[kind][name] = Family(name, factory, names, info.name, description)
            else:
                self._entries[kind][name] = Entry(name, factory, info.name, description)
            info.provides[kind].append(name)

        return register

    def _fail(self, info: PluginInfo, message: str, exc: BaseException | None = None) -> None:
        self.plugins[info.name] = info
        # A disabled plugin provides nothing, not even what it registered before failing.
        for kind in KINDS:
            for entries in (self._entries[kind], self._families[kind]):
                for name in [n for n, e in entries.items() if e.plugin == info.name]:
                    del entries[name]
            info.provides[kind].clear()
        info.error = message if info.error is None else info.error
        if exc is not None and debug_enabled():
            traceback.print_exception(exc, file=sys.stderr)
        print(f"dinocli: plugin {info.name!r} disabled: {message}", file=sys.stderr)

    # -- lookup ----------------------------------------------------------------------------

    def names(self, kind: str, expand: bool = False) -> list[str]:
        """Sorted names registered for ``kind`` (one of :data:`KINDS`); with ``expand``, also every
        name of every pattern (which may import the libraries behind them)."""
        names = set(self._entries[kind])
        if expand:
            for family in self._families[kind].values():
                names.update(family.names())
        return sorted(names)

    def families(self, kind: str) -> list[Family]:
        """The patterns registered for ``kind`` (``timm/*``), sorted; their names are not computed."""
        return [self._families[kind][p] for p in sorted(self._families[kind])]

    def completions(self, kind: str, incomplete: str) -> list[str]:
        """Names of ``kind`` that start with ``incomplete``, for shell completion: a pattern's prefix
        stands for its names until ``incomplete`` reaches into it."""
        found = [n for n in self._entries[kind] if n.startswith(incomplete)]
        for family in self._families[kind].values():
            if incomplete.startswith(family.prefix):
                found += [n for n in family.names() if n.startswith(incomplete)]
            elif family.prefix.startswith(incomplete):
                found.append(family.prefix)
        return sorted(found)

    def get(self, kind: str, name: str) -> Entry:
        """The entry for ``name`` (a pattern's names included), or a :class:`UsageError` that
        suggests the closest name."""
        if name in self._entries[kind]:
            return self._entries[kind][name]
        similar: list[str] = []
        for family in self._families[kind].values():
            if name.startswith(family.prefix):
                if name in family.names():
                    member = name[len(family.prefix):]
                    return Entry(name, partial(family.factory, member), family.plugin, family.description)
                similar += family.names()
        listed = [*self._entries[kind], *self._families[kind]]
        error = unknown_name(KINDS[kind][1], name, listed, similar)
        failed = sorted(n for n, info in self.plugins.items() if info.error)
        if failed:  # the name may belong to a plugin that could not load
            listing = ", ".join(repr(n) for n in failed)
            error = UsageError(f"{error} Disabled by errors: plugin {listing} (see 'dino plugins').")
        raise error

    def create(self, kind: str, name: str, **kwargs: Any) -> Any:
        """Build ``name`` with its factory; a failure inside the factory names the plugin."""
        entry = self.get(kind, name)
        try:
            return entry.factory(**kwargs)
        except DinoError:
            raise
        except Exception as exc:
            raise DinoError(f"{self.describe(kind, name)} failed to build: {type(exc).__name__}: {exc}") from exc

    def describe(self, kind: str, name: str) -> str:
        """``backbone 'x' from plugin 'p'``: how messages name something a plugin provides."""
        try:
            plugin = self.get(kind, name).plugin
        except UsageError:
            return f"{KINDS[kind][1]} {name!r}"
        return f"{KINDS[kind][1]} {name!r} from plugin {plugin!r}"


def _is_builtin(ep: metadata.EntryPoint) -> bool:
    return ep.value.startswith("dinocli.") and ep.dist is not None and ep.dist.name == "dinocli"


def _allowed_external() -> set[str] | None:
    value = os.environ.get(ENV_VAR)
    if value is None or value.strip() in ("", "all"):
        return None
    if value.strip().lower() in ("none", "0", "off"):
        return set()
    return {name.strip() for name in value.split(",") if name.strip()}


def _hook_problem(exc: BaseException) -> str:
    """What pluggy found wrong with a plugin's hooks, in dinocli's words: a misspelled hook name, or a
    hook whose argument is not ``register``; anything else as pluggy says it, on one line."""
    text = _one_line(exc)
    hooks = [hook for hook, *_ in KINDS.values()]
    if found := re.match(r"unknown hook '(\w+)'", text):
        close = difflib.get_close_matches(found.group(1), hooks, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"dinocli's hooks are {', '.join(hooks)}"
        return f"unknown hook {found.group(1)!r}; {hint}"
    if found := re.search(r"hookimpl definition: (\w+\(.*?\))", text):
        return f"hook {found.group(1)} must take one argument named 'register'"
    return text


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` with its lines joined (pluggy says what is wrong on the later ones)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        registry = Registry()
        registry.load_entry_points()
        if not any(info.builtin for info in registry.plugins.values()):
            raise DinoError(
                "dinocli's built-in plugins were not found: install the package "
                "(pip install -e .) so that its entry points exist"
            )
        _REGISTRY = registry
    return _REGISTRY


def reset_registry() -> None:
    """Forget the loaded registry (the next lookup reloads the entry points)."""
    global _REGISTRY
    _REGISTRY = None


def list_backbones() -> list[str]:
    """Names of every registered backbone."""
    return get_registry().names("backbones")


def list_augmentations() -> list[str]:
    """Names of every registered augmentation pipeline."""
    return get_registry().names("augmentations")


def list_collapse_strategies() -> list[str]:
    """Names of every registered collapse-avoidance strategy."""
    return get_registry().names("collapse_strategies")


def list_recipes() -> list[str]:
    """Names of every registered pretraining recipe."""
    return get_registry().names("recipes")


def list_loggers() -> list[str]:
    """Names of every registered logger (metrics sink)."""
    return get_registry().names("loggers")


def create_backbone(name: str, **kwargs: Any) -> Any:
    """Build backbone ``name`` (e.g. ``vit_small``) with random weights.

    What the factory returns must be an ``nn.Module`` with an integer ``embed_dim``; otherwise
    the error names the plugin that registered ``name``.
    """
    from torch import nn

    registry = get_registry()
    model = registry.create("backbones", name, **kwargs)
    embed_dim = getattr(model, "embed_dim", None)
    if not isinstance(model, nn.Module) or not _is_count(embed_dim, 1):
        what = type(model).__name__ if not isinstance(model, nn.Module) else f"embed_dim={embed_dim!r}"
        raise DinoError(
            f"{registry.describe('backbones', name)} is broken: its factory must return an "
            f"nn.Module with an integer embed_dim, got {what}"
        )
    return model


def create_augmentation(name: str, **kwargs: Any) -> Any:
    """Build augmentation pipeline ``name`` (e.g. ``dino``).

    What the factory returns must be callable with integer ``n_global >= 1`` and ``n_local >= 0``,
    the latter equal to ``local_crops_number`` when that is passed; otherwise the error names the
    plugin that registered ``name``.
    """
    registry = get_registry()
    augmentation = registry.create("augmentations", name, **kwargs)
    n_global, n_local = getattr(augmentation, "n_global", None), getattr(augmentation, "n_local", None)
    if not callable(augmentation) or not _is_count(n_global, 1) or not _is_count(n_local, 0):
        raise DinoError(
            f"{registry.describe('augmentations', name)} is broken: its factory must return a callable "
            f"with integer n_global >= 1 and n_local >= 0, got {type(augmentation).__name__} with "
            f"n_global={n_global!r}, n_local={n_local!r}"
        )
    wanted = kwargs.get("local_crops_number")
    if wanted is not None and n_local != wanted:
        raise DinoError(
            f"{registry.describe('augmentations', name)} is broken: it makes n_local={n_local} local "
            f"crops when asked for local_crops_number={wanted}"
        )
    return augmentation


def create_collapse_strategy(name: str, **kwargs: Any) -> Any:
    """Build collapse-avoidance strategy ``name`` (e.g. ``centering``); what the factory returns
    must be a :class:`dinocli.CollapseStrategy`, or the error names the plugin."""
    from dinocli.interfaces import CollapseStrategy

    registry = get_registry()
    strategy = registry.create("collapse_strategies", name, **kwargs)
    if not isinstance(strategy, CollapseStrategy):
        raise DinoError(
            f"{registry.describe('collapse_strategies', name)} is broken: its factory must return a "
            f"dinocli.CollapseStrategy, got {type(strategy).__name__}"
        )
    if getattr(strategy, "provides_targets", True) and type(strategy).targets is CollapseStrategy.targets:
        raise DinoError(
            f"{registry.describe('collapse_strategies', name)} is broken: {type(strategy).__name__} has "
            "provides_targets = True (the default) but does not define targets(); a strategy that only adds a "
            "regulariser sets provides_targets = False"
        )
    return strategy


def _is_count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


__all__ = [
    "Entry",
    "Family",
    "PluginInfo",
    "Registry",
    "UsageError",
    "create_augmentation",
    "create_backbone",
    "create_collapse_strategy",
    "get_registry",
    "list_augmentations",
    "list_backbones",
    "list_collapse_strategies",
    "list_recipes",
    "reset_registry",
]
