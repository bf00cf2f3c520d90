"""The README's table of chapter times is generated from the golden runs' record."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_readme_chapter_times_are_generated_not_typed():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "readme_times.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_generator_replaces_only_the_block():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import readme_times
    finally:
        sys.path.pop(0)
    text = (f"before\n{readme_times.START}\n| stale |\n{readme_times.END}\nbetween\n"
            f"{readme_times.MORPHO_START}\nstale build\n{readme_times.MORPHO_END}\nafter\n")
    out = readme_times.rewrite(text)
    assert out.startswith("before\n") and out.endswith("after\n") and "\nbetween\n" in out
    assert "| stale |" not in out and "| chapter | wall | kernel CPU | load | peak memory |" in out
    assert "stale build" not in out and "Building the renders took" in out
    with pytest.raises(SystemExit, match="morpho-build"):
        readme_times.rewrite(text.replace(readme_times.MORPHO_END, ""))
