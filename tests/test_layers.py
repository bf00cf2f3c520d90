"""The package's import direction, read from every module's source (no imports run).

Imports run downward only. A module of the layer on the left may import
the layers on the right of it, and its own layer (a subpackage's modules
import each other):

    top (cli*, scorecard, plotting, chapter, utils, flowjac)  -> anything
    pipelines   -> models, estimators, engine, closedform, data, causal, base
    models      -> estimators, engine, closedform, data, causal, base
    estimators  -> engine, closedform, base
    engine      -> closedform, base
    closedform  -> base
    data        -> causal, base
    causal      -> base
    base        -> _checks          (and every layer may import _checks)

So the engine never imports an estimator or a model, closed forms never
import the engine (nor training code: no optimiser, no ``backward`` in
``closedform/``), data and causal models know no flows, and only the top
imports the chapter kit (``flowjac.chapter``). ``flowjac.utils`` is the
chapters' old address of the ground floor and the kit: a package module
may import ground-floor names through it (the kit is then not loaded),
never a name of the kit. SymPy is imported in ``closedform/`` only.
``KNOWN`` lists the departures still in the code, each with its reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "flowjac"

TOP = "top"
BELOW = {
    "pipelines": {"models", "estimators", "engine", "closedform", "data", "causal", "base"},
    "models": {"estimators", "engine", "closedform", "data", "causal", "base"},
    "estimators": {"engine", "closedform", "base"},
    "engine": {"closedform", "base"},
    "closedform": {"base"},
    "data": {"causal", "base"},
    "causal": {"base"},
    "base": set(),
    "_checks": set(),
}
GROUND_NAMES = {"DEVICES", "repo_root", "seed_everything", "get_device", "atomic_write_bytes", "atomic_torch_save",
                "resume_state",
                "save_json", "load_results", "hardware", "_TMP_INFIX", "_cpu_model",
                "_json_default", "_umask"}

#: (importing module, imported module) -> why it is still there (none left).
KNOWN: dict = {}
#: closed-form modules that still train a network -> why (none left).
KNOWN_TRAINING: dict = {}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """The layer of a flowjac module: its subpackage, the ground floor, or the top."""
    parts = module.split(".")
    if len(parts) == 1:
        return TOP                                   # flowjac/__init__.py
    return parts[1] if parts[1] in BELOW else TOP


def imports(path: Path, root: Path = PACKAGE):
    """(imported flowjac module, names, line) of every import in a file, at any depth."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = tuple(a.name for a in node.names)
            if target.count(".") < 2 and target.startswith("flowjac"):
                # from flowjac import utils / from flowjac.engine import ode
                subs = [f"{target}.{n}" for n in names
                        if (root.parent / f"{target}.{n}".replace(".", "/")).exists()
                        or (root.parent / (f"{target}.{n}".replace(".", "/") + ".py")).exists()]
                if subs:
                    for s in subs:
                        yield s, (), node.lineno
                    continue
            yield target, names, node.lineno


def upward_imports(root: Path = PACKAGE) -> list[str]:
    """Every import of a flowjac module that the direction forbids, but those in ``KNOWN``."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        me = module_name(path, root)
        mine = layer(me)
        for target, names, line in imports(path, root):
            where = f"{path.relative_to(root.parent)}:{line}: {me} imports {target}"
            if target.split(".")[0] == "sympy" and layer(me) != "closedform":
                bad.append(f"{where} (SymPy lives in closedform/ only)")
            if not target.startswith("flowjac") or mine == TOP:
                continue
            if target == "flowjac.utils":
                kit = sorted(set(names) - GROUND_NAMES)
                if kit or not names:
                    bad.append(f"{where} {kit or '(the module)'}: the chapter kit is "
                               "for chapters; import the ground floor, flowjac.base")
                continue
            theirs = layer(target)
            if target == "flowjac":
                theirs = TOP
            if theirs in (mine, "_checks") or theirs in BELOW[mine]:
                continue
            if (me, target) in KNOWN:
                continue
            bad.append(f"{where} (the layer {mine} may import {sorted(BELOW[mine])}, "
                       f"not {theirs})")
    return bad


def training_in_closed_forms(root: Path = PACKAGE) -> list[str]:
    """Closed-form modules that use an optimiser or call ``backward``, but those in ``KNOWN_TRAINING``."""
    bad = []
    for path in sorted((root / "closedform").rglob("*.py")):
        me = module_name(path, root)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("optim", "backward") \
                    and me not in KNOWN_TRAINING:
                bad.append(f"{path.relative_to(root.parent)}:{node.lineno}: {node.attr}")
    return bad


def test_the_layers_are_read():
    mods = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert {"flowjac.engine.ode", "flowjac.base", "flowjac.chapter"} <= mods
    assert layer("flowjac.engine.ode") == "engine" and layer("flowjac.utils") == TOP
    found = {t for t, _, _ in imports(PACKAGE / "engine" / "train.py")}
    assert {"flowjac.base", "flowjac.engine.checkpoints"} <= found


def test_imports_run_downward_only():
    bad = upward_imports()
    assert not bad, "imports against the direction (see this file's docstring):\n" + \
        "\n".join(bad)


def test_closed_forms_train_nothing():
    bad = training_in_closed_forms()
    assert not bad, "training code in closedform/ (it belongs in the engine):\n" + \
        "\n".join(bad)


def test_the_known_departures_still_exist():
    """An entry of ``KNOWN`` that the code no longer needs is removed."""
    for me, target in KNOWN:
        path = PACKAGE.parent / (me.replace(".", "/") + ".py")
        if path.exists():
            assert any(t == target for t, _, _ in imports(path)), \
                f"{me} no longer imports {target}: remove it from KNOWN"
