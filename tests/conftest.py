"""Shared fixtures: the golden book is rendered once per test run, whatever the number of workers."""
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class GoldenRender:
    proc: subprocess.CompletedProcess    # `build_book.py render-golden`
    html: Path                           # its _build/html

    def log_tail(self, n: int = 4000) -> str:
        return self.proc.stdout[-n:] + self.proc.stderr[-n:]


def _render(out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "build_book.py"),
           "render-golden", "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="session")
def golden_render(tmp_path_factory, worker_id) -> GoldenRender:
    """The golden notebooks rendered by Jupyter Book (no execution), once.

    Under pytest-xdist every worker has its own session; the first to ask
    renders into the run's shared temporary folder under a file lock and
    writes the result beside it, and the others read it (the pattern of
    pytest-xdist's documentation), so the book is rendered once, not once
    per worker.
    """
    if worker_id == "master":                  # no xdist: this session is the run
        out = tmp_path_factory.mktemp("golden_book")
        return GoldenRender(_render(out), out / "_build" / "html")
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent      # common to the run's workers
    out, done = shared / "golden_book", shared / "golden_book.json"
    with FileLock(str(shared / "golden_book.lock")):
        if not done.exists():
            proc = _render(out)
            done.write_text(json.dumps(dict(args=proc.args, returncode=proc.returncode,
                                            stdout=proc.stdout, stderr=proc.stderr)))
        rec = json.loads(done.read_text())
    proc = subprocess.CompletedProcess(rec["args"], rec["returncode"], rec["stdout"],
                                       rec["stderr"])
    return GoldenRender(proc, out / "_build" / "html")
