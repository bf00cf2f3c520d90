"""Shared fixtures: the golden book is rendered once per pytest session."""
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


@pytest.fixture(scope="session")
def golden_render(tmp_path_factory) -> GoldenRender:
    """The golden notebooks rendered by Jupyter Book (no execution), once."""
    out = tmp_path_factory.mktemp("golden_book")
    cmd = [sys.executable, str(ROOT / "tools" / "build_book.py"),
           "render-golden", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return GoldenRender(proc, out / "_build" / "html")
