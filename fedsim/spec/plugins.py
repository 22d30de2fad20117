"""Plugins: the one resolver behind every scenario field that names code (`policy.name`, `data.name`,
`model.name`, `training.loss`).

Such a field holds one of

* a **built-in name** ("mnist", "mlp", "cross_entropy"), mapped by the caller to an import path such as
  "fedsim.learn.models:MLP" and imported only when named, so this layer never imports the layers above it;
* a name **registered by an installed package** in an entry-point group (`fedsim.policies`,
  `fedsim.datasets`, `fedsim.models`): in the package's `pyproject.toml`,
  `[project.entry-points."fedsim.datasets"] cifar10 = "mypackage.data:Cifar10"`. A built-in name wins over
  a registered one of the same spelling; a name two packages register is refused as ambiguous;
* an **import path** "package.module:Name" (the module must be importable: installed, or on PYTHONPATH).

`check_plugin_name` checks the spelling without importing anything (scenario reading); `load_plugin`
imports the object and checks it is of the expected kind with the caller's predicate. Every failure is a
one-line `ScenarioError` naming the field and the value: a malformed path, a module that does not exist
(told apart from a module that fails while importing), a missing attribute, an object of another kind, an
unknown name (with the built-in and registered names, and the closest match). `call_plugin` runs plugin
code the same way: whatever it raises, `sys.exit()` included, becomes a `ScenarioError` on the field.
"""

from __future__ import annotations

import difflib
import importlib
import types
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

from fedsim.errors import FedsimError, ScenarioError
from fedsim.spec.fields import printable

__all__ = ["call_plugin", "check_plugin_name", "describe_exception", "load_plugin", "registered_plugins",
           "what_happened"]

_SHOWN_CHARS = 300      # an exception's text quoted in a message is cut to this many characters
_ABSENT = object()


def describe_exception(exc: BaseException) -> str:
    """The text of `exc` on one line, cut to a readable length."""
    text = printable(str(exc))
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def what_happened(exc: BaseException) -> str:
    """`called sys.exit(3)` or `raised ValueError: text`, to follow the name of the code that did it."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    return f"raised {type(exc).__name__}: {describe_exception(exc)}"


def _show(value: str) -> str:
    text = printable(repr(value))
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}... ({len(value)} characters)"


def registered_plugins(group: str | None) -> dict[str, list[metadata.EntryPoint]]:
    """The names installed packages register in entry-point `group` (None: no group), each with its entry
    points (more than one when several packages register the same name)."""
    if group is None:
        return {}
    found: dict[str, list[metadata.EntryPoint]] = {}
    for ep in metadata.entry_points(group=group):
        same = found.setdefault(ep.name, [])
        if all(ep.value != other.value for other in same):
            same.append(ep)
    return found


def _package(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"package {dist.name!r}" if dist is not None else "an installed package"


def _split_path(value: str) -> tuple[str, str] | None:
    """("package.module", "Name") of a well-formed import path, else None."""
    module, sep, attr = value.partition(":")
    if not sep or ":" in attr:
        return None
    if not all(part.isidentifier() for part in module.split(".")):
        return None
    if not all(part.isidentifier() for part in attr.split(".")):
        return None
    return module, attr


def _unknown(value: str, builtins: Mapping[str, str], registered: Mapping[str, list], kind: str,
             form: str) -> str:
    names = [*builtins, *(n for n in sorted(registered) if n not in builtins)]
    close = difflib.get_close_matches(value, names, n=1)
    known = ", ".join(repr(n) for n in builtins) + " (built in)"
    if any(n not in builtins for n in registered):
        others = ", ".join(f"{n!r} ({_package(registered[n][0])})" for n in sorted(registered) if n not in builtins)
        known += f"; registered: {others}"
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {_show(value)}{hint}; known: {known}; or an import path {form!r}"


def check_plugin_name(value: str, *, group: str | None, builtins: Mapping[str, str], source: str, field: str,
                      kind: str, form: str = "package.module:Name") -> None:
    """Raise ScenarioError unless `value` is a built-in name, a registered one or a well-formed import path.

    Imports nothing (entry points are read from the installed packages' metadata)."""
    if value in builtins:
        return
    if ":" in value:
        if _split_path(value) is None:
            raise ScenarioError(source, field, f"a {kind} import path must read {form!r}, got {_show(value)}")
        return
    registered = registered_plugins(group)
    if value not in registered:
        raise ScenarioError(source, field, _unknown(value, builtins, registered, kind, form))
    if len(registered[value]) > 1:
        where = " and ".join(f"{ep.value!r} ({_package(ep)})" for ep in registered[value])
        raise ScenarioError(source, field, f"{kind} {_show(value)} is registered twice, as {where}; name one by "
                                           f"its import path")


def load_plugin(value: str, *, group: str | None, builtins: Mapping[str, str], source: str, field: str,
                kind: str, form: str = "package.module:Name", check: Callable[[Any], bool] | None = None,
                expected: str = "") -> Any:
    """The object `value` names (see the module docstring); `check(obj)` false is a ScenarioError saying the
    object is not `expected` (e.g. "callable", "a subclass of fedsim.learn.datasets.DataSource")."""
    check_plugin_name(value, group=group, builtins=builtins, source=source, field=field, kind=kind, form=form)
    label = f"{kind} {_show(value)}"
    if value in builtins:
        module, attr = builtins[value].split(":")
    elif ":" in value:
        module, attr = _split_path(value)   # type: ignore[misc]
    else:
        ep = registered_plugins(group)[value][0]
        label += f" (registered by {_package(ep)} as {ep.value!r})"
        module, attr = ep.module, ep.attr
    obj = _import(module, attr, label, source, field)
    if check is not None and not check(obj):
        raise ScenarioError(source, field, f"{label} is not {expected}, got {_kind_of(obj)}")
    return obj


def _kind_of(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return f"the module {obj.__name__!r}"
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    return type(obj).__name__


def _missing_module(exc: ImportError, module: str) -> bool:
    """Whether `exc` says `module` itself (or a package above it) does not exist, rather than something
    the module imports."""
    name = getattr(exc, "name", None)
    return isinstance(exc, ModuleNotFoundError) and bool(name) and (module == name or module.startswith(name + "."))


def _import(module: str, attr: str | None, label: str, source: str, field: str) -> Any:
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        if _missing_module(exc, module):
            raise ScenarioError(source, field, f"cannot import module {_show(module)} of {label}: "
                                               f"{describe_exception(exc)}") from None
        raise ScenarioError(source, field, f"importing module {_show(module)} of {label} failed: "
                                           f"{type(exc).__name__}: {describe_exception(exc)}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a broken user module may raise anything at import time, sys.exit included
        happened = what_happened(exc) if isinstance(exc, SystemExit) else \
            f"failed: {type(exc).__name__}: {describe_exception(exc)}"
        raise ScenarioError(source, field, f"importing module {_show(module)} of {label} {happened}") from None
    for part in (attr.split(".") if attr else ()):
        try:
            found = getattr(obj, part, _ABSENT)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:   # a module-level __getattr__ (or a property) may raise too
            happened = what_happened(exc) if isinstance(exc, SystemExit) else \
                f"failed: {type(exc).__name__}: {describe_exception(exc)}"
            raise ScenarioError(source, field, f"looking up {_show(attr)} in module {_show(module)} of {label} "
                                               f"{happened}") from None
        if found is _ABSENT:
            raise ScenarioError(source, field, f"module {_show(module)} has no attribute {_show(attr)} ({label})")
        obj = found
    return obj


def call_plugin(function: Callable[..., Any], *args: Any, source: str, field: str, label: str) -> Any:
    """`function(*args)`, plugin code: a ScenarioError it raises passes through, any other exception (and
    `sys.exit()`) becomes a ScenarioError on `field` naming `label` (e.g. "data set 'cifar'")."""
    try:
        return function(*args)
    except ScenarioError:
        raise
    except FedsimError as exc:
        raise ScenarioError(source, field, f"{label}: {describe_exception(exc)}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise ScenarioError(source, field, f"{label} {what_happened(exc)}") from None
