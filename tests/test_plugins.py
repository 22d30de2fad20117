"""The one plugin resolver (fedsim.spec.plugins): built-in names, names installed packages register as entry
points, import paths, and a located one-line error for every way a name can be wrong."""

from __future__ import annotations

import sys
import textwrap

import pytest

from fedsim.errors import DataError, ScenarioError
from fedsim.spec.plugins import call_plugin, check_plugin_name, load_plugin, registered_plugins

GROUP = "fedsim.test_things"
BUILTINS = {"alpha": "fedsim_test_things:Alpha", "beta": "fedsim_test_things:beta"}

THINGS = """
    class Alpha:
        pass

    def beta():
        return "beta"

    def gamma():
        return "gamma"

    class Holder:
        def delta():
            return "delta"

    not_callable = 42
    nothing = None
"""


def install(root, dist: str, entry_points: dict[str, dict[str, str]]) -> None:
    """A distribution `dist` under `root` (a folder on sys.path) registering `entry_points` {group: {name: value}}."""
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in names.items())
        for group, names in entry_points.items()))


@pytest.fixture
def things(tmp_path, monkeypatch):
    (tmp_path / "fedsim_test_things.py").write_text(textwrap.dedent(THINGS))
    (tmp_path / "fedsim_test_broken_import.py").write_text("import fedsim_no_such_dependency_xyz\n")
    (tmp_path / "fedsim_test_raising_import.py").write_text("raise ValueError('broken at import')\n")
    (tmp_path / "fedsim_test_exit_import.py").write_text("import sys\nsys.exit(4)\n")
    (tmp_path / "fedsim_test_getattr.py").write_text("def __getattr__(name):\n    raise RuntimeError('no ' + name)\n")
    install(tmp_path, "fedsim_test_dist", {GROUP: {"gamma": "fedsim_test_things:gamma",
                                                  "delta": "fedsim_test_things:Holder.delta",
                                                  "alpha": "fedsim_test_things:gamma",
                                                  "lost": "fedsim_no_such_module_xyz:f"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in list(sys.modules):
        if name.startswith("fedsim_test_"):
            del sys.modules[name]


def load(value: str, **kw):
    options = dict(group=GROUP, builtins=BUILTINS, source="s.toml", field="thing.name", kind="thing")
    return load_plugin(value, **(options | kw))


def error(value: str, **kw) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        load(value, **kw)
    err = info.value
    assert err.source == "s.toml" and err.field == "thing.name", err
    assert len(str(err).splitlines()) == 1 and repr(value) in err.message, err.message
    return err


def test_builtin_registered_and_path(things):
    import fedsim_test_things as mod

    assert load("alpha") is mod.Alpha                       # a built-in wins over a registered "alpha"
    assert load("beta")() == "beta"
    assert load("gamma")() == "gamma"                        # registered by fedsim_test_dist
    assert load("delta")() == "delta"                        # a dotted attribute, as entry points allow
    assert load("fedsim_test_things:gamma")() == "gamma"
    assert load("fedsim_test_things:Holder.delta")() == "delta"
    assert load("beta", check=callable, expected="callable")() == "beta"
    assert set(registered_plugins(GROUP)) == {"gamma", "delta", "alpha", "lost"}
    assert registered_plugins(None) == {}


def test_names_are_checked_without_importing(things):
    check_plugin_name("fedsim_not_imported_xyz:f", group=GROUP, builtins=BUILTINS, source="s.toml",
                      field="thing.name", kind="thing")
    check_plugin_name("gamma", group=GROUP, builtins=BUILTINS, source="s.toml", field="thing.name", kind="thing")
    assert "fedsim_not_imported_xyz" not in sys.modules and "fedsim_test_things" not in sys.modules


@pytest.mark.parametrize("value", ["a:b:c", ":f", "mod:", "my-mod:f", "mod:1f", "a..b:f", "mod: f"])
def test_malformed_paths(things, value):
    err = error(value, form="package.module:function")
    assert "import path must read 'package.module:function'" in err.message


def test_unknown_name_lists_builtin_and_registered_names_and_the_closest(things):
    err = error("gama")
    assert "unknown thing 'gama'" in err.message and "did you mean 'gamma'?" in err.message
    assert "'alpha', 'beta' (built in)" in err.message
    assert "registered: 'delta' (package 'fedsim_test_dist'), 'gamma' (package 'fedsim_test_dist')" in err.message
    assert "'package.module:Name'" in err.message
    assert "did you mean" not in error("zzzzzz").message


def test_module_missing_is_told_from_a_failing_import(things):
    assert "cannot import module 'fedsim_no_such_module_xyz' of thing" in \
        error("fedsim_no_such_module_xyz:f").message
    assert "cannot import module 'fedsim_no_such_pkg_xyz.sub'" in error("fedsim_no_such_pkg_xyz.sub:f").message
    inside = error("fedsim_test_broken_import:f").message
    assert "importing module 'fedsim_test_broken_import'" in inside
    assert "failed: ModuleNotFoundError: No module named 'fedsim_no_such_dependency_xyz'" in inside
    assert "failed: ValueError: broken at import" in error("fedsim_test_raising_import:f").message
    assert "called sys.exit(4)" in error("fedsim_test_exit_import:f").message


def test_attribute_errors(things):
    assert "module 'fedsim_test_things' has no attribute 'missing'" in error("fedsim_test_things:missing").message
    assert "has no attribute 'Holder.nope'" in error("fedsim_test_things:Holder.nope").message
    assert "RuntimeError: no thing" in error("fedsim_test_getattr:thing").message


def test_the_callers_check_names_the_kind(things):
    err = error("fedsim_test_things:not_callable", check=callable, expected="callable")
    assert "thing 'fedsim_test_things:not_callable' is not callable, got int" in err.message
    assert "got NoneType" in error("fedsim_test_things:nothing", check=callable, expected="callable").message
    assert "got the class fedsim_test_things.Alpha" in \
        error("alpha", check=lambda obj: not isinstance(obj, type), expected="an instance").message


def test_registered_names_report_their_package(things):
    err = error("lost")
    assert "registered by package 'fedsim_test_dist' as 'fedsim_no_such_module_xyz:f'" in err.message
    assert "cannot import module 'fedsim_no_such_module_xyz'" in err.message


def test_a_name_two_packages_register_is_ambiguous(things):
    install(things, "fedsim_test_other", {GROUP: {"gamma": "fedsim_test_things:beta"}})
    err = error("gamma")
    assert "registered twice" in err.message and "'fedsim_test_things:gamma'" in err.message
    assert "'fedsim_test_things:beta'" in err.message and "import path" in err.message


def test_hostile_values_stay_on_one_line(things):
    for value in ["a\nb", "x:y\u2028z", "q" * 5000, "q" * 5000 + ":f"]:
        with pytest.raises(ScenarioError) as info:
            load(value)
        text = str(info.value)
        assert info.value.field == "thing.name" and text.isprintable() and len(text) < 1000, text


def test_call_plugin_turns_everything_into_a_scenario_error():
    def run(function):
        with pytest.raises(ScenarioError) as info:
            call_plugin(function, source="s.toml", field="data.name", label="data set 'x'")
        assert info.value.field == "data.name"
        return info.value.message

    def boom():
        raise RuntimeError("boom")

    def leaves():
        sys.exit(3)

    def bad_file():
        raise DataError("/x/y: truncated")

    def own():
        raise ScenarioError("s.toml", "data.root", "its own words")

    assert run(boom) == "data set 'x' raised RuntimeError: boom"
    assert run(leaves) == "data set 'x' called sys.exit(3)"
    assert run(bad_file) == "data set 'x': /x/y: truncated"
    with pytest.raises(ScenarioError) as info:
        call_plugin(own, source="s.toml", field="data.name", label="x")
    assert info.value.field == "data.root" and info.value.message == "its own words"
    assert call_plugin(lambda a, b: a + b, 1, 2, source="s.toml", field="f", label="x") == 3


def test_model_name_takes_a_model_registered_in_fedsim_models(tmp_path, monkeypatch, capsys):
    from conftest import BASE_TOML, scenario
    from fedsim.cli import main
    from fedsim.sim.build import build_components
    from helper_models import Tiny

    install(tmp_path, "fedsim_test_models", {"fedsim.models": {"tinynet": "tests.helper_models:tiny"}})
    monkeypatch.syspath_prepend(str(tmp_path))
    comp = build_components(scenario('model.name="tinynet"'))
    assert type(comp.model).__name__ == Tiny.__name__ and comp.profile.n_layers == 3
    path = tmp_path / "s.toml"
    path.write_text(BASE_TOML)
    assert main(["validate", str(path), "--set", 'model.name="tinynet"']) == 0
    assert main(["validate", str(path), "--set", 'model.name="tinynett"']) == 2
    err = capsys.readouterr().err
    assert "model.name: unknown model 'tinynett' (did you mean 'tinynet'?)" in err
    assert "registered: 'tinynet' (package 'fedsim_test_models')" in err
