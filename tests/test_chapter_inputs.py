"""The development loop's record of chapter inputs (tools/chapter_inputs.py)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import chapter_inputs as ci  # noqa: E402

sys.path.pop(0)


def test_inputs_follow_imports_and_named_data():
    nb = ROOT / "notebooks" / "gaussian.ipynb"
    static = ci.chapter_inputs(nb)
    assert "notebooks/gaussian.ipynb" in static
    # imported by the chapter, and imported in turn by what it imports
    assert "flowjac/closedform/gaussian.py" in static
    assert "flowjac/closedform/symbolic.py" in static
    assert "flowjac/utils.py" in static and "flowjac/_checks.py" in static
    # a traced kernel names exactly what it loaded: a module it never
    # loaded does not re-run the chapter
    loaded = [str(ROOT / "flowjac" / f) for f in ("__init__.py", "utils.py",
                                                  "closedform/gaussian.py")]
    traced = ci.chapter_inputs(nb, loaded)
    assert "flowjac/closedform/gaussian.py" in traced
    assert "flowjac/closedform/symbolic.py" not in traced
    assert not any(k.startswith("results/") for k in traced)
    attrs = ci.chapter_inputs(ROOT / "notebooks" / "attributes.ipynb")
    assert "results/attributes_probes.pt" in attrs
    assert "flowjac/weights/manifest.json" in attrs
    assert "(python and libraries)" in attrs


def test_the_startup_file_traces_a_kernels_modules(tmp_path):
    import json
    import os
    import subprocess

    ipy = ci.tracing_ipython_dir(tmp_path / "ipython")
    trace = tmp_path / "trace.json"
    env = dict(os.environ, IPYTHONDIR=str(ipy), FLOWJAC_TRACE_FILE=str(trace),
               FLOWJAC_TRACE_ROOT=str(ROOT / "flowjac") + os.sep)
    quiet = {k: v for k, v in env.items() if k != "FLOWJAC_TRACE_FILE"}
    subprocess.run([sys.executable, "-m", "IPython", "-c",
                    "from flowjac.closedform import gaussian"], env=quiet, check=True,
                   capture_output=True, timeout=120)
    assert not trace.exists()          # traced only when the test run asks
    subprocess.run([sys.executable, "-m", "IPython", "-c",
                    "from flowjac.closedform import gaussian"], env=env, check=True,
                   capture_output=True, timeout=120)
    files = json.loads(trace.read_text())
    assert str(ROOT / "flowjac" / "closedform" / "gaussian.py") in files
    assert all(f.startswith(str(ROOT / "flowjac")) for f in files)


def test_relative_imports_resolve_inside_the_package():
    import ast

    tree = ast.parse("from .utils import setup\nfrom ..engine import ode\n")
    assert ci.imported_modules(tree, "flowjac") >= {"flowjac.utils"}
    assert "flowjac.engine.ode" in ci.imported_modules(tree, "flowjac.models.nets")


def test_plan_skips_a_passed_chapter_until_an_input_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(ci, "RECORDS", tmp_path)
    nb = ROOT / "notebooks" / "gaussian.ipynb"
    assert ci.plan([nb])["gaussian"]["reason"] == "never passed here"
    inputs = ci.chapter_inputs(nb)
    ci.record_pass("gaussian", inputs)
    p = ci.plan([nb])["gaussian"]
    assert not p["run"] and "unchanged" in p["reason"]
    ci.record_pass("gaussian", dict(inputs, **{"flowjac/closedform/gaussian.py": "0" * 64}))
    p = ci.plan([nb])["gaussian"]
    assert p["run"] and p["reason"] == "changed: flowjac/closedform/gaussian.py"
