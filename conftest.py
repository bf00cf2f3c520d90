"""Hooks of the whole test run (tests/ and the chapters under nbval): the test loop."""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


# --- the test loop: two workers, chapters whole, and the development loop ---
# ``make test`` runs on two xdist workers (one torch thread each) with
# ``--dist loadfile``: every chapter's cells stay together on one worker
# (nbval runs them in one kernel) and every test file stays on one worker
# (its module fixtures are built once). (``--dist loadgroup`` would be finer,
# but pytest-xdist 3.8 cannot name groups under pytest 9: it writes the
# group into a node-id attribute pytest 9 no longer reads.) ``make test-changed`` adds --changed-only: chapters whose
# inputs (tools/chapter_inputs.py) have not changed since they last passed
# are not re-executed, and the header says which ran and why.
def _chapter_inputs():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import chapter_inputs
    finally:
        sys.path.pop(0)
    return chapter_inputs


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_addoption(parser):
    parser.addoption("--changed-only", action="store_true", default=False,
                     help="skip chapters whose inputs are unchanged since they "
                          "last passed (tools/chapter_inputs.py)")


TRACE_DIR = ROOT / "_build" / "nbval-trace"


def pytest_configure(config):
    config._chapter_plan = None
    config._chapter_reports = {}
    ci = _chapter_inputs()
    if config.getoption("--changed-only"):
        config._chapter_plan = ci.plan(sorted((ROOT / "notebooks").glob("*.ipynb")))
    # chapters' kernels record the flowjac modules they load (tools/chapter_inputs.py)
    if not _is_worker(config):
        TRACE_DIR.mkdir(parents=True, exist_ok=True)
        ci.tracing_ipython_dir(TRACE_DIR / "ipython")
    os.environ["IPYTHONDIR"] = str(TRACE_DIR / "ipython")
    os.environ["FLOWJAC_TRACE_ROOT"] = str(ROOT / "flowjac") + os.sep


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    path = Path(str(item.path))
    if path.suffix == ".ipynb":     # before nbval starts this chapter's kernel
        os.environ["FLOWJAC_TRACE_FILE"] = str(TRACE_DIR / f"{path.stem}.json")


def pytest_report_header(config):
    plan = config._chapter_plan
    if not plan:
        return None
    lines = ["chapters (--changed-only):"]
    for stem, p in plan.items():
        lines.append(f"  {'run ' if p['run'] else 'skip'} {stem}: {p['reason']}")
    return lines


def pytest_collection_modifyitems(config, items):
    plan = config._chapter_plan
    if plan is None:
        return
    keep, dropped = [], []
    for item in items:
        path = Path(str(item.path))
        if path.suffix == ".ipynb" and path.stem in plan and not plan[path.stem]["run"]:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if not (path.startswith("notebooks/") and path.endswith(".ipynb")):
        return
    config = _CONFIG.get("config")
    if config is None or _is_worker(config):
        return
    stem = Path(path).stem
    state = config._chapter_reports.setdefault(stem, {"passed": 0, "failed": 0})
    if report.failed:
        state["failed"] += 1
    elif report.passed and report.when == "call":
        state["passed"] += 1


_CONFIG = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    _CONFIG["config"] = session.config


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if _is_worker(config) or not config._chapter_reports:
        return
    ci = _chapter_inputs()
    for stem, state in config._chapter_reports.items():
        nb = ROOT / "notebooks" / f"{stem}.ipynb"
        cells = sum(c.get("cell_type") == "code" for c in json.loads(nb.read_text())["cells"])
        if state["failed"] or state["passed"] != cells:     # a partial run proves nothing
            continue
        trace = ci.traced_modules(TRACE_DIR / f"{stem}.json")
        ci.record_pass(stem, ci.chapter_inputs(nb, trace))
