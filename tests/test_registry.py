"""The plugin registry: loading, failure isolation, duplicates, unknown names, ``dino plugins``."""

from __future__ import annotations

import inspect
import json
import re
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dinocli
import dinocli.backbones.vit as vit_module
import dinocli.registry as registry_module
from dinocli import hookspecs
from dinocli.cli import app
from dinocli.errors import DinoError, UsageError
from dinocli.registry import ENV_VAR, PluginInfo, Registry, get_registry

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
JSON_KEYS = {
    "name", "distribution", "version", "backbones", "augmentations", "collapse_strategies", "recipes", "loggers", "error"
}


# -- helpers ------------------------------------------------------------------------------------


class TinyNet(torch.nn.Module):
    embed_dim = 4
    patch_size = None
    supports_attention = False

    def __init__(self, **_):
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)

    def forward(self, x):
        return self.proj(x.mean(dim=(2, 3)))


def backbone_plugin(*names, factory=TinyNet):
    """A fake plugin object registering ``names`` as backbones."""

    @dinocli.hookimpl
    def dinocli_register_backbones(register):
        for name in names:
            register(name, factory, description=f"test backbone {name}")

    return SimpleNamespace(dinocli_register_backbones=dinocli_register_backbones)


def info(name: str) -> PluginInfo:
    return PluginInfo(name=name, distribution=f"{name}-dist", version="1.2.3", builtin=False)


def stderr_lines(captured: str, needle: str) -> list[str]:
    return [line for line in captured.splitlines() if needle in line]


@pytest.fixture
def write_module(tmp_path, monkeypatch):
    """Write an importable module ``name`` with ``source`` into a folder on ``sys.path``."""
    folder = tmp_path / "modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    created: list[str] = []

    def write(name: str, source: str) -> metadata.EntryPoint:
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        created.append(name)
        return metadata.EntryPoint(name=name.replace("_", "-"), value=name, group="dinocli")

    yield write
    for name in created:
        sys.modules.pop(name, None)


GOOD_MODULE = """
    import torch
    import dinocli

    class Net(torch.nn.Module):
        embed_dim = 2
        patch_size = None
        supports_attention = False

        def __init__(self, **kwargs):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x.mean(dim=(2, 3)))

    @dinocli.hookimpl
    def dinocli_register_backbones(register):
        register("{name}", Net)
"""


def builtin_entry_points() -> list[metadata.EntryPoint]:
    return [
        ep
        for ep in metadata.entry_points(group="dinocli")
        if ep.dist is not None and ep.dist.name == "dinocli"
    ]


# -- registering --------------------------------------------------------------------------------


def test_register_create_and_list():
    reg = Registry()
    reg.add_plugin(backbone_plugin("net_a", "net_b"), info("mine"))
    assert reg.names("backbones") == ["net_a", "net_b"]
    assert reg.names("augmentations") == [] and reg.names("collapse_strategies") == []
    entry = reg.get("backbones", "net_b")
    assert entry.plugin == "mine" and entry.description == "test backbone net_b"
    model = reg.create("backbones", "net_a", patch_size=16, img_size=32)
    assert isinstance(model, TinyNet)
    assert reg.plugins["mine"].provides["backbones"] == ["net_a", "net_b"]
    assert reg.plugins["mine"].error is None


def test_duplicate_name_names_both_plugins_and_disables_the_second(capsys):
    reg = Registry()
    reg.add_plugin(backbone_plugin("net_a"), info("first"))
    reg.add_plugin(backbone_plugin("net_extra", "net_a"), info("second"))
    error = reg.plugins["second"].error
    assert error == "backbone 'net_a' is registered twice: by plugin 'first' and by plugin 'second'"
    lines = stderr_lines(capsys.readouterr().err, "second")
    assert lines == [f"dinocli: plugin 'second' disabled: {error}"]
    # the first keeps its name; nothing of the disabled plugin stays, even what came before
    assert reg.get("backbones", "net_a").plugin == "first"
    assert reg.names("backbones") == ["net_a"]
    assert reg.plugins["second"].provides["backbones"] == []


def test_a_failing_hook_disables_the_whole_plugin_once(capsys):
    @dinocli.hookimpl
    def dinocli_register_backbones(register):
        register("half_net", TinyNet)
        raise KeyError("lost my config")

    @dinocli.hookimpl
    def dinocli_register_augmentations(register):
        register("later_aug", object)

    @dinocli.hookimpl
    def dinocli_register_collapse_strategies(register):
        raise RuntimeError("second failure")

    reg = Registry()
    plugin = SimpleNamespace(
        dinocli_register_backbones=dinocli_register_backbones,
        dinocli_register_augmentations=dinocli_register_augmentations,
        dinocli_register_collapse_strategies=dinocli_register_collapse_strategies,
    )
    reg.add_plugin(plugin, info("half"))
    assert reg.plugins["half"].error == "dinocli_register_backbones raised KeyError: 'lost my config'"
    assert reg.names("backbones") == reg.names("augmentations") == reg.names("collapse_strategies") == []
    assert reg.plugins["half"].provides == {
        "backbones": [], "augmentations": [], "collapse_strategies": [], "recipes": [], "loggers": []
    }
    assert len(stderr_lines(capsys.readouterr().err, "'half' disabled")) == 1


def test_same_name_in_different_kinds_is_fine():
    @dinocli.hookimpl
    def dinocli_register_collapse_strategies(register):
        register("shared", lambda **_: dinocli.CollapseStrategy())

    reg = Registry()
    reg.add_plugin(backbone_plugin("shared"), info("a"))
    strategies = SimpleNamespace(dinocli_register_collapse_strategies=dinocli_register_collapse_strategies)
    reg.add_plugin(strategies, info("b"))
    assert reg.plugins["a"].error is None and reg.plugins["b"].error is None
    assert reg.names("backbones") == ["shared"] == reg.names("collapse_strategies")


def test_bad_registrations_are_reported(capsys):
    @dinocli.hookimpl
    def dinocli_register_backbones(register):
        register("not_callable", 42)

    @dinocli.hookimpl
    def dinocli_register_augmentations(register):
        raise RuntimeError("cannot register today")

    reg = Registry()
    reg.add_plugin(SimpleNamespace(dinocli_register_backbones=dinocli_register_backbones), info("p1"))
    reg.add_plugin(SimpleNamespace(dinocli_register_augmentations=dinocli_register_augmentations), info("p2"))
    assert reg.plugins["p1"].error == (
        "plugin 'p1' registered backbone 'not_callable' with a factory that is not callable"
    )
    assert reg.plugins["p2"].error == (
        "dinocli_register_augmentations raised RuntimeError: cannot register today"
    )
    err = capsys.readouterr().err
    assert len(stderr_lines(err, "'p1' disabled")) == 1 and len(stderr_lines(err, "'p2' disabled")) == 1


def test_unknown_name_suggests_the_closest():
    reg = Registry()
    reg.add_plugin(vit_module, info("vit"))
    with pytest.raises(UsageError) as caught:
        reg.get("backbones", "vit_smal")
    assert str(caught.value) == (
        "unknown backbone 'vit_smal'. Did you mean 'vit_small'? Available: vit_base, vit_small, vit_tiny."
    )
    assert caught.value.exit_code == 2
    with pytest.raises(UsageError, match=r"^unknown collapse strategy 'x'\. Available: none\.$"):
        reg.get("collapse_strategies", "x")
    with pytest.raises(UsageError) as far:
        reg.get("backbones", "zzzzzzzz")
    assert "Did you mean" not in str(far.value)


def test_unknown_name_through_the_public_api(fresh_registry):
    with pytest.raises(UsageError, match=r"unknown backbone 'vit_smal'\. Did you mean 'vit_small'\?"):
        dinocli.create_backbone("vit_smal")
    with pytest.raises(UsageError, match=r"Did you mean 'centering'\?"):
        dinocli.create_collapse_strategy("centring")


def test_factory_that_raises_names_the_plugin():
    def broken_factory(**kwargs):
        raise ValueError(f"width must be positive, got {kwargs['width']}")

    def picky_factory(**kwargs):
        raise UsageError("picky wants img_size >= 64")

    reg = Registry()
    reg.add_plugin(backbone_plugin("flaky", factory=broken_factory), info("flaky-plugin"))
    reg.add_plugin(backbone_plugin("picky", factory=picky_factory), info("picky-plugin"))
    with pytest.raises(DinoError) as caught:
        reg.create("backbones", "flaky", width=-1)
    assert str(caught.value) == (
        "backbone 'flaky' from plugin 'flaky-plugin' failed to build: "
        "ValueError: width must be positive, got -1"
    )
    assert caught.value.exit_code == 1
    # the plugin's own usage errors reach the user unchanged
    with pytest.raises(UsageError, match="^picky wants img_size >= 64$"):
        reg.create("backbones", "picky")


# -- loading from entry points ------------------------------------------------------------------


def test_plugin_that_raises_on_import_is_isolated(write_module, capsys):
    broken = write_module("dinotest_broken", "raise RuntimeError('boom at import')\n")
    good = write_module("dinotest_good", GOOD_MODULE.replace("{name}", "good_net"))
    reg = Registry()
    reg.load_entry_points([broken, good])

    failure = reg.plugins["dinotest-broken"]
    assert failure.error == "failed to import dinotest_broken: RuntimeError: boom at import"
    assert failure.distribution == "?" and not failure.builtin
    assert reg.plugins["dinotest-good"].error is None
    assert reg.names("backbones") == ["good_net"]
    assert reg.create("backbones", "good_net")(torch.zeros(1, 3, 8, 8)).shape == (1, 2)
    reg.names("backbones")  # lookups do not report again
    lines = stderr_lines(capsys.readouterr().err, "dinotest-broken")
    assert lines == [f"dinocli: plugin 'dinotest-broken' disabled: {failure.error}"]


def test_misspelled_hook_is_an_error_naming_the_plugin(write_module, capsys):
    typo = write_module(
        "dinotest_typo",
        """
        import dinocli

        @dinocli.hookimpl
        def dinocli_register_backbone(register):  # missing the final "s"
            register("never", object)

        @dinocli.hookimpl
        def dinocli_register_augmentations(register):
            register("also_never", object)
        """,
    )
    wrong_arg = write_module(
        "dinotest_wrong_arg",
        """
        import dinocli

        @dinocli.hookimpl
        def dinocli_register_backbones(reg):
            reg("never_either", object)
        """,
    )
    good = write_module("dinotest_fine", GOOD_MODULE.replace("{name}", "fine_net"))
    reg = Registry()
    reg.load_entry_points([typo, wrong_arg, good])

    assert reg.plugins["dinotest-typo"].error == (
        "unknown hook 'dinocli_register_backbone'; did you mean 'dinocli_register_backbones'?"
    )
    assert reg.plugins["dinotest-wrong-arg"].error == (
        "hook dinocli_register_backbones(reg) must take one argument named 'register'"
    )
    assert reg.names("augmentations") == []  # the valid hook of a rejected plugin is not run either
    assert reg.names("backbones") == ["fine_net"]
    err = capsys.readouterr().err
    typo_line = "plugin 'dinotest-typo' disabled: unknown hook 'dinocli_register_backbone'"
    assert len(stderr_lines(err, typo_line)) == 1
    assert len(stderr_lines(err, "plugin 'dinotest-wrong-arg' disabled")) == 1


def test_a_wrong_hook_argument_says_which_argument(write_module):
    wrong_arg = write_module(
        "dinotest_arg_named",
        """
        import dinocli

        @dinocli.hookimpl
        def dinocli_register_backbones(reg):
            reg("never", object)
        """,
    )
    reg = Registry()
    reg.load_entry_points([wrong_arg])
    error = reg.plugins["dinotest-arg-named"].error
    assert error == "hook dinocli_register_backbones(reg) must take one argument named 'register'"


def test_a_plugin_that_exits_or_prints_at_import_leaves_the_others_and_stdout_alone(write_module, capsys):
    exits = write_module("dinotest_exits", "import sys\nsys.exit('bye from the plugin')\n")
    chatty = write_module("dinotest_chatty", "\n    print('hello from the plugin')" + GOOD_MODULE.replace("{name}", "chatty_net"))
    reg = Registry()
    reg.load_entry_points([exits, chatty])
    assert reg.plugins["dinotest-exits"].error == "failed to import dinotest_exits: SystemExit: bye from the plugin"
    assert reg.names("backbones") == ["chatty_net"]
    out, err = capsys.readouterr()
    assert out == ""  # stdout stays the command's own (dino plugins --json)
    assert "hello from the plugin" in err


def test_an_unmarked_hook_is_reported_not_silently_ignored(write_module, capsys):
    unmarked = write_module(
        "dinotest_unmarked",
        """
        def dinocli_register_backbones(register):  # no @dinocli.hookimpl
            register("never", object)
        """,
    )
    reg = Registry()
    reg.load_entry_points([unmarked])
    assert reg.names("backbones") == []
    assert reg.plugins["dinotest-unmarked"].error == (  # `dino plugins` shows it, not "ok"
        "dinocli_register_backbones is not marked with @dinocli.hookimpl, so it is not called"
    )
    assert stderr_lines(capsys.readouterr().err, "dinotest-unmarked") == [
        "dinocli: plugin 'dinotest-unmarked': dinocli_register_backbones is not marked with "
        "@dinocli.hookimpl, so it is not called"
    ]


@pytest.mark.parametrize("name", ["mean,centering", "csv, too", " padded", "two words"])
def test_a_name_with_commas_or_spaces_is_refused(name):
    reg = Registry()
    reg.add_plugin(backbone_plugin(name), info("spaced"))
    assert reg.plugins["spaced"].error == (
        f"plugin 'spaced' registered backbone {name!r}: a name cannot hold commas or spaces "
        "(--collapse and --logger take comma-separated names)"
    )
    assert reg.names("backbones") == []


def test_debug_shows_where_a_plugin_failed_to_import(write_module, monkeypatch, capsys):
    broken = write_module("dinotest_deep", "def helper():\n    raise ValueError('deep inside')\nhelper()\n")
    monkeypatch.setenv("DINOCLI_DEBUG", "1")
    Registry().load_entry_points([broken])
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "dinotest_deep.py\", line 2, in helper" in err
    assert err.rstrip().endswith("disabled: failed to import dinotest_deep: ValueError: deep inside")


def test_two_entry_points_with_one_name_keep_the_first(write_module, capsys):
    first = write_module("dinotest_first", GOOD_MODULE.replace("{name}", "first_net"))
    second = write_module("dinotest_second", GOOD_MODULE.replace("{name}", "second_net"))
    same_name = metadata.EntryPoint(name="dinotest-first", value=second.value, group="dinocli")
    reg = Registry()
    reg.load_entry_points([first, same_name])
    assert reg.names("backbones") == ["first_net"]
    assert reg.plugins["dinotest-first"].error is None
    assert stderr_lines(capsys.readouterr().err, "dinotest-first") == [
        "dinocli: plugin 'dinotest-first' from ? ignored: a plugin of that name was already loaded from ?"
    ]


@pytest.mark.parametrize(
    "value, expected",
    [(None, {"dinotest-one", "dinotest-two"}), ("all", {"dinotest-one", "dinotest-two"}),
     ("dinotest-two", {"dinotest-two"}), (" dinotest-one , other ", {"dinotest-one"}),
     ("none", set())],
)
def test_env_var_restricts_external_plugins(write_module, monkeypatch, value, expected):
    one = write_module("dinotest_one", GOOD_MODULE.replace("{name}", "net_one"))
    two = write_module("dinotest_two", GOOD_MODULE.replace("{name}", "net_two"))
    if value is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, value)
    reg = Registry()
    reg.load_entry_points([*builtin_entry_points(), one, two])
    external = {name for name, p in reg.plugins.items() if not p.builtin}
    assert external == expected
    # built-ins are never restricted
    assert {"vit", "resnet", "centering"} <= {name for name, p in reg.plugins.items() if p.builtin}
    assert "vit_small" in reg.names("backbones")


def test_env_var_naming_no_installed_plugin_says_so(write_module, monkeypatch, capsys):
    one = write_module("dinotest_one", GOOD_MODULE.replace("{name}", "net_one"))
    monkeypatch.setenv(ENV_VAR, "dinotest-one,dinotest-onw,vit")  # a typo; a built-in is always loaded
    reg = Registry()
    reg.load_entry_points([*builtin_entry_points(), one])
    assert "dinotest-one" in reg.plugins
    assert capsys.readouterr().err == (
        f"dinocli: {ENV_VAR} names 'dinotest-onw', which no installed plugin is (installed: dinotest-one)\n"
    )
    monkeypatch.setenv(ENV_VAR, "dinotest-one")
    Registry().load_entry_points([*builtin_entry_points(), one])
    assert capsys.readouterr().err == ""


def test_example_plugin_is_discovered_through_real_entry_points(fresh_registry, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    try:
        version = metadata.version("dino-example")
    except metadata.PackageNotFoundError:
        pytest.fail("the example plugin is not installed: pip install -e plugins/dino-example")
    plugin = get_registry().plugins["example"]
    assert (plugin.distribution, plugin.version, plugin.builtin, plugin.error) == (
        "dino-example", version, False, None
    )
    assert plugin.provides == {
        "backbones": ["example_cnn"],
        "augmentations": ["example_simple"],
        "collapse_strategies": ["me-max"],
        "recipes": [],
        "loggers": [],
    }


# -- dino plugins -----------------------------------------------------------------------------


def test_plugins_json_shape(cli, fresh_registry, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    result = cli.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data) == ["plugins"]
    rows = {row["name"]: row for row in data["plugins"]}
    for row in rows.values():
        assert set(row) == JSON_KEYS
        assert row["error"] is None or isinstance(row["error"], str)
    vit = rows["vit"]
    assert vit["distribution"] == "dinocli" and vit["version"] == dinocli.__version__
    assert vit["backbones"] == ["vit_tiny", "vit_small", "vit_base"] and vit["error"] is None
    assert "resnet50" in rows["resnet"]["backbones"]
    assert rows["centering"]["collapse_strategies"] == ["centering"]


def test_plugins_shows_a_failed_plugin_and_the_rest(cli, fresh_registry, write_module, monkeypatch):
    broken = write_module("dinotest_cli_broken", "import this_module_does_not_exist\n")
    real = list(metadata.entry_points(group="dinocli"))
    monkeypatch.setattr(
        registry_module, "metadata", SimpleNamespace(entry_points=lambda group: [*real, broken])
    )
    monkeypatch.delenv(ENV_VAR, raising=False)
    result = cli.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0
    rows = {row["name"]: row for row in json.loads(result.stdout)["plugins"]}
    assert rows["dinotest-cli-broken"]["error"] == (
        "failed to import dinotest_cli_broken: ModuleNotFoundError: "
        "No module named 'this_module_does_not_exist'"
    )
    assert rows["dinotest-cli-broken"]["backbones"] == []
    assert rows["vit"]["error"] is None
    assert len(stderr_lines(result.stderr, "dinotest-cli-broken")) == 1

    table = cli.invoke(app, ["plugins"], env={"COLUMNS": "400"})  # registry is loaded: no new report
    assert table.exit_code == 0
    line = next(line for line in table.stdout.splitlines() if "dinotest-cli-broken" in line)
    assert "failed: failed to import dinotest_cli_broken" in line
    vit_line = next(line for line in table.stdout.splitlines() if "vit_small" in line)
    assert "dinocli (built-in)" in vit_line and "ok" in vit_line
    assert stderr_lines(table.stderr, "dinotest-cli-broken") == []


def test_plugins_shows_an_entry_point_named_like_a_built_in_and_fits_a_narrow_terminal(
    cli, fresh_registry, write_module, monkeypatch
):
    shadow = write_module("dinotest_shadow", GOOD_MODULE.replace("{name}", "shadow_net"))
    named_vit = metadata.EntryPoint(name="vit", value=shadow.value, group="dinocli")
    real = list(metadata.entry_points(group="dinocli"))
    monkeypatch.setattr(registry_module, "metadata", SimpleNamespace(entry_points=lambda group: [*real, named_vit]))
    monkeypatch.delenv(ENV_VAR, raising=False)
    result = cli.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0
    vits = [row for row in json.loads(result.stdout)["plugins"] if row["name"] == "vit"]
    assert [row["error"] for row in vits] == [
        None, "not loaded: the name is taken by dinocli"
    ]
    assert vits[1]["backbones"] == [] and "shadow_net" not in get_registry().names("backbones")

    narrow = cli.invoke(app, ["plugins"], env={"COLUMNS": "80"})
    assert narrow.exit_code == 0
    lines = narrow.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    rows = [line.split("│") for line in lines if line.count("│") == 5]
    provides, status = (" ".join(row[i].strip() for row in rows) for i in (3, 4))
    assert "backbones: vit_tiny, vit_small, vit_base" in provides  # what each provides, in one readable cell
    assert status.count("not loaded: the name is taken by dinocli") == 1
    assert narrow.exit_code == 0  # a listing; --check makes a problem the exit code
    checked = cli.invoke(app, ["plugins", "--json", "--check"])
    assert checked.exit_code == 1 and json.loads(checked.stdout)["plugins"]
    assert checked.stderr.strip() == "error: 1 plugin(s) have problems: vit"


def test_plugins_expand_lists_the_patterns_whose_names_can_be_listed(cli, fresh_registry, monkeypatch):
    def broken_names():
        raise RuntimeError("listing exploded")

    @dinocli.hookimpl
    def dinocli_register_backbones(register):
        register("bad/*", TinyNet, names=broken_names)
        register("good/*", TinyNet, names=lambda: ["a", "b"])

    monkeypatch.setenv(ENV_VAR, "none")
    get_registry().add_plugin(SimpleNamespace(dinocli_register_backbones=dinocli_register_backbones), info("lister"))
    result = cli.invoke(app, ["plugins", "--expand", "--json"])
    assert result.exit_code == 0, result.output
    row = next(r for r in json.loads(result.stdout)["plugins"] if r["name"] == "lister")
    assert row["pattern_names"] == {"good/*": ["good/a", "good/b"]}
    assert row["pattern_errors"] == {
        "bad/*": "plugin 'lister' cannot list the names of 'bad/*': RuntimeError: listing exploded"
    }
    table = cli.invoke(app, ["plugins", "--expand"], env={"COLUMNS": "400"})
    assert table.exit_code == 0, table.output
    line = next(line for line in table.stdout.splitlines() if "lister" in line)
    assert "bad/* (cannot list its names: plugin 'lister' cannot list" in line and "good/* (2 names)" in line
    assert "vit_small" in table.stdout


def test_plugins_subprocess_honours_env_var(run_dino):
    everything = run_dino("plugins", "--json", env={ENV_VAR: "all"})
    assert everything.returncode == 0, everything.stderr
    names = {row["name"] for row in json.loads(everything.stdout)["plugins"]}
    assert {"vit", "resnet", "centering", "example"} <= names
    builtins_only = run_dino("plugins", "--json", env={ENV_VAR: "none"})
    rows = json.loads(builtins_only.stdout)["plugins"]
    assert rows and all(row["distribution"] == "dinocli" for row in rows)


# -- documentation --------------------------------------------------------------------------------


def hookspec_functions():
    return [
        fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, f"{hookspecs.PROJECT}_spec")
    ]


def test_every_hookspec_is_documented():
    specs = hookspec_functions()
    assert {fn.__name__ for fn in specs} == {hook for hook, *_ in registry_module.KINDS.values()}
    docs = DOCS.read_text(encoding="utf-8")
    for fn in specs:
        doc = inspect.getdoc(fn) or ""
        assert len(doc) > 100, f"{fn.__name__} needs a docstring"
        assert fn.__name__ in docs, f"docs/plugins.md does not mention {fn.__name__}"
        # every keyword argument the hookspec promises is explained in the guide too
        passed = doc.split("Keyword arguments", 1)[1]
        for kwarg in re.findall(r"``(\w+)``", passed):
            assert f"`{kwarg}`" in docs, f"docs/plugins.md does not explain {kwarg!r} ({fn.__name__})"
    for needed in (ENV_VAR, "[project.entry-points.dinocli]", "provides_targets", "regularizer"):
        assert needed in docs, f"docs/plugins.md does not explain {needed}"
