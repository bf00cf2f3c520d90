"""The user's own network named on the command line, checked before anything runs.

``parse_arch`` reads a network's constructor arguments (``--arch``: a dict,
an inline JSON object or a .json file); ``import_class`` resolves
``MODULE:CLASS`` (``--model-class``, ``--wrapper``) to a
``torch.nn.Module`` subclass defined in MODULE itself, refusing a module
whose source has no ``class`` statement for CLASS without importing it.
``open_flow`` builds the flow_matching network from them. Their own room
because they are the one place where flowjac imports and builds code the
user names, and the checks on it belong together; re-exported by
``flowjac.models.adapters``. Explained in :ref:`sec_byom`.
"""
from __future__ import annotations

from torch import nn

__all__ = ["parse_arch", "import_class"]

_DOTTED = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"


def parse_arch(text) -> dict | None:
    """A network's constructor arguments from a dict, an inline JSON object or a .json file (``--arch``); :ref:`sec_byom`."""
    import json
    from pathlib import Path

    if text is None or isinstance(text, dict):
        return None if text is None else dict(text)
    text = str(text)
    if text.lstrip().startswith("{"):
        source, raw = "--arch", text
    else:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"arch {text!r} is neither an inline JSON "
                                    "object nor an existing .json file")
        source, raw = f"arch file {text!r}", path.read_text()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON ({err.msg} at line "
                         f"{err.lineno} column {err.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{source} must be a JSON object of constructor "
                         f"arguments, got {type(value).__name__}")
    return value


def _class_statement(tree, qualname: str) -> bool:
    """Whether a parsed module defines ``qualname`` (``Outer.Inner`` for a
    nested class) by ``class`` statements at its top level (also inside
    if, try and with blocks), read without running the module."""
    import ast

    compound = tuple(getattr(ast, n) for n in ("If", "Try", "TryStar", "With")
                     if hasattr(ast, n))

    def find(stmts, name):
        for stmt in stmts:
            if isinstance(stmt, ast.ClassDef) and stmt.name == name:
                return stmt
            if isinstance(stmt, compound):
                blocks = [stmt.body, getattr(stmt, "orelse", []),
                          getattr(stmt, "finalbody", [])]
                blocks += [h.body for h in getattr(stmt, "handlers", [])]
                for block in blocks:
                    hit = find(block, name)
                    if hit is not None:
                        return hit
        return None

    node = tree
    for name in qualname.split("."):
        node = find(node.body, name)
        if node is None:
            return False
    return True


def import_class(spec, what: str = "model_class"):
    """The ``torch.nn.Module`` subclass that ``MODULE:CLASS`` names, defined in MODULE itself, or one clear ValueError; nothing is called; :ref:`sec_byom`.

    The working folder is put on the import path first (as ``python -m``
    does), so that a class beside the user's command imports under both
    entry points. A module not yet imported is read and parsed before it
    is imported: unless its source defines CLASS with a ``class``
    statement, it is refused without running it. Importing it runs its
    import-time code; after the import the object must be a class, a
    ``torch.nn.Module`` subclass, and defined in MODULE (not re-exported
    there, as ``subprocess:Popen``-like names of other modules would be).
    The caller builds it only after these checks.
    """
    import ast
    import importlib
    import importlib.util
    import os
    import re
    import sys

    module, sep, name = str(spec).partition(":")
    if not (sep and re.fullmatch(_DOTTED, module) and re.fullmatch(_DOTTED, name)):
        raise ValueError(f"{what} must be MODULE:CLASS (dotted Python names, e.g. "
                         f"mypackage.models:MyNet), got {spec!r}")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        if module not in sys.modules:
            try:
                found = importlib.util.find_spec(module)
            except Exception as err:   # a parent package failed to import
                raise ValueError(f"{what} {spec!r}: cannot find {module!r} "
                                 f"({type(err).__name__}: {err})") from None
            if found is None:
                raise ValueError(f"{what} {spec!r}: no module {module!r} in the "
                                 f"working folder {cwd!r} or the installed "
                                 "packages")
            try:
                source = found.loader.get_source(module)
            except Exception:
                source = None
            if source is None:
                raise ValueError(f"{what} {spec!r}: {module!r} has no Python "
                                 "source that flowjac can check before "
                                 "importing it; give a class of a .py module")
            try:
                tree = ast.parse(source)
            except SyntaxError as err:
                raise ValueError(f"{what} {spec!r}: {module!r} is not valid "
                                 f"Python ({err.msg}, line {err.lineno})") from None
            if not _class_statement(tree, name):
                raise ValueError(f"{what} {spec!r}: {module!r} has no class "
                                 f"statement for {name!r}; name a class defined "
                                 "in the module itself (it was not imported)")
        try:
            obj = importlib.import_module(module)
        except Exception as err:
            raise ValueError(f"{what} {spec!r}: importing {module!r} failed "
                             f"({type(err).__name__}: {err})") from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: {module!r} has no {name!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ValueError(f"{what} {spec!r} is a {type(obj).__name__}, not a "
                         "class; give your network's torch.nn.Module class")
    if not issubclass(obj, nn.Module):
        raise ValueError(f"{what} {spec!r} is not a torch.nn.Module subclass; "
                         "flowjac builds only networks (it was not called)")
    if obj.__module__ != module or obj.__qualname__ != name:
        raise ValueError(f"{what} {spec!r} is defined in {obj.__module__!r}, "
                         f"not in {module!r}; name it where it is defined, "
                         f"{obj.__module__}:{obj.__qualname__}")
    return obj



def _user_network(model_class, wrapper, arch) -> nn.Module:
    """The user's --model-class built with ``arch`` (checked before it is
    called), wrapped as ``wrapper(model)`` when a wrapper is named."""
    cls = import_class(model_class) if isinstance(model_class, str) else model_class
    wrap = None if wrapper is None else (
        import_class(wrapper, "wrapper") if isinstance(wrapper, str) else wrapper)
    for what, c in (("model_class", cls), ("wrapper", wrap)):
        if c is not None and not (isinstance(c, type) and issubclass(c, nn.Module)):
            raise ValueError(f"{what} must be a torch.nn.Module subclass, got {c!r}")
    try:
        net = cls(**arch)
    except TypeError as err:
        raise ValueError(f"arch does not fit {model_class}: {err}") from None
    except Exception as err:    # the user's constructor failed
        raise ValueError(f"model_class {model_class} failed to build "
                         f"from arch ({type(err).__name__}: {err})") from None
    if wrap is not None:
        try:
            net = wrap(net)
        except Exception as err:
            raise ValueError(f"wrapper {wrapper} failed to wrap the "
                             f"{model_class} network as wrapper(model) "
                             f"({type(err).__name__}: {err})") from None
    return net
