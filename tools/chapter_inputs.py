"""What each chapter's golden notebook depends on, hashed, for the development test loop.

``make test-changed`` re-executes (under nbval) only the chapters whose
inputs changed since they last passed. A chapter's inputs are

* its golden notebook (code, prose and the outputs nbval compares);
* the flowjac modules its kernel had loaded after its last cell (traced at
  run time: the test run points IPython at a startup file, written here,
  that records them after every cell), or, where no trace exists, every
  flowjac module reachable from its imports through the package's own
  imports (read with ``ast``; lazy imports inside functions included);
* the stored results (``results/*``) and shipped weights
  (``flowjac/weights/*``) whose file name or stem appears in the chapter's
  code or in one of those modules, and the manifest when
  ``flowjac.models.pretrained`` is among them;
* the Python version and every installed distribution's version.

After a run in which every cell of a chapter passed, its inputs are
recorded in ``_build/nbval-passed/<chapter>.json``; the next run with
``--changed-only`` skips the chapter when they are unchanged and says which
inputs changed otherwise. CI (``make test``) always runs every chapter.
"""
from __future__ import annotations

import ast
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flowjac"
RECORDS = ROOT / "_build" / "nbval-passed"
DATA_DIRS = (ROOT / "results", PACKAGE / "weights")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def module_file(name: str) -> Path | None:
    """The source file of flowjac module ``name`` (a package's __init__), or None."""
    if name != "flowjac" and not name.startswith("flowjac."):
        return None
    parts = name.split(".")[1:]
    base = PACKAGE.joinpath(*parts)
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(tree: ast.AST, current: str | None = None) -> set[str]:
    """flowjac module names imported anywhere in ``tree`` (relative imports resolved against ``current``)."""
    found = set()
    package = None
    if current is not None:
        is_pkg = module_file(current) is not None and module_file(current).name == "__init__.py"
        package = current if is_pkg else current.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level and package is not None:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            for alias in node.names:        # from flowjac.x import submodule
                found.add(f"{mod}.{alias.name}")
    out = set()
    for name in found:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a.b.c imports a and a.b too
            prefix = ".".join(parts[:i])
            if module_file(prefix) is not None:
                out.add(prefix)
    return out


def closure(names: set[str]) -> set[Path]:
    """Every flowjac source file reachable from the modules ``names``."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        todo.extend(imported_modules(tree, name) - seen)
    return {module_file(n) for n in seen if module_file(n) is not None}


def _code_cells(nb_path: Path) -> list[str]:
    nb = json.loads(nb_path.read_text())
    out = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        src = "".join(cell.get("source", []))
        # IPython magics and shell lines are not Python
        out.append("\n".join("" if ln.lstrip().startswith(("%", "!")) else ln
                             for ln in src.splitlines()))
    return out


def chapter_inputs(nb_path: Path, modules=None) -> dict[str, str]:
    """``{input: sha256}`` of one golden notebook (see the module docstring).

    ``modules``: the flowjac source files its kernel loaded (a trace); None
    for the static import closure.
    """
    nb_path = Path(nb_path)
    code = _code_cells(nb_path)
    if modules is None:
        names: set[str] = set()
        for src in code:
            try:
                names |= imported_modules(ast.parse(src))
            except SyntaxError:
                names.add("flowjac")
        files = closure(names)
    else:
        files = {Path(m) for m in modules if Path(m).is_file()}
    texts = "\n".join(code + [f.read_text() for f in sorted(files)])
    inputs = {str(nb_path.relative_to(ROOT)): _sha(nb_path)}
    inputs.update({str(f.relative_to(ROOT)): _sha(f) for f in sorted(files)})
    uses_manifest = (PACKAGE / "models" / "pretrained.py") in files
    for folder in DATA_DIRS:
        for f in sorted(folder.glob("*")):
            if not f.is_file() or f.name == "README.md":
                continue
            named = f.name in texts or f.stem in texts
            if named or (uses_manifest and f.name == "manifest.json"):
                inputs[str(f.relative_to(ROOT))] = _sha(f)
    inputs["(python and libraries)"] = _libraries()
    return inputs


def _libraries() -> str:
    from importlib import metadata

    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                   if d.metadata["Name"] and d.metadata["Name"].lower() != "flowjac")
    return hashlib.sha256("\n".join([sys.version] + dists).encode()).hexdigest()


def digest(inputs: dict[str, str]) -> str:
    """One hash of a chapter's inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _current(inputs: dict[str, str]) -> dict[str, str]:
    """The same inputs' hashes now."""
    now = {}
    for key in inputs:
        path = ROOT / key
        if key == "(python and libraries)":
            now[key] = _libraries()
        else:
            now[key] = _sha(path) if path.is_file() else "(missing)"
    return now


def plan(nb_paths) -> dict[str, dict]:
    """For each notebook: ``run`` (bool) and the ``reason``."""
    out = {}
    for nb in nb_paths:
        nb = Path(nb)
        rec_path = RECORDS / f"{nb.stem}.json"
        if not rec_path.exists():
            out[nb.stem] = dict(run=True, reason="never passed here")
            continue
        old = json.loads(rec_path.read_text()).get("inputs", {})
        if str(nb.relative_to(ROOT)) not in old:
            out[nb.stem] = dict(run=True, reason="no record of its notebook")
            continue
        now = _current(old)
        changed = sorted(k for k in old if old[k] != now[k])
        if changed:
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            out[nb.stem] = dict(run=True, reason=f"changed: {shown}")
        else:
            out[nb.stem] = dict(run=False, reason="inputs unchanged since it last passed")
    return out


STARTUP = """\
# Written by tools/chapter_inputs.py for the test run: after every cell,
# record the flowjac modules this kernel has loaded.
import json as _json, os as _os, sys as _sys
_trace = _os.environ.get("FLOWJAC_TRACE_FILE")
_root = _os.environ.get("FLOWJAC_TRACE_ROOT", "")
if _trace and _root:
    def _flowjac_trace(*_args):
        files = sorted({m.__file__ for m in list(_sys.modules.values())
                        if (getattr(m, "__file__", None) or "").startswith(_root)})
        tmp = _trace + ".tmp"
        with open(tmp, "w") as fh:
            _json.dump(files, fh)
        _os.replace(tmp, _trace)
    get_ipython().events.register("post_run_cell", _flowjac_trace)
"""


def tracing_ipython_dir(where: Path) -> Path:
    """An IPYTHONDIR whose startup file records each kernel's flowjac modules (``STARTUP``)."""
    startup = Path(where) / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-flowjac-trace.py").write_text(STARTUP)
    return Path(where)


def traced_modules(trace_file: Path):
    """The module files a chapter's kernel recorded, or None without a trace."""
    try:
        return json.loads(Path(trace_file).read_text())
    except (OSError, ValueError):
        return None


def record_pass(stem: str, inputs: dict[str, str]) -> Path:
    """Record that chapter ``stem`` passed with ``inputs``."""
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"{stem}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(dict(digest=digest(inputs), inputs=inputs), indent=1, sort_keys=True))
    tmp.replace(path)
    return path


if __name__ == "__main__":
    for stem, p in plan(sorted((ROOT / "notebooks").glob("*.ipynb"))).items():
        print(f"{stem:20s} {'run ' if p['run'] else 'skip'}  {p['reason']}")
