"""The book as a whole: chapters and golden notebooks agree, and the golden
notebooks render with Jupyter Book 1.x with warnings as errors."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_book  # noqa: E402


def test_every_toc_chapter_has_parameters_and_a_checked_cell():
    for md in build_book.chapters():
        cells = build_book.read_md(md).cells
        tags = [set(c.metadata.get("tags", [])) for c in cells
                if c.cell_type == "code"]
        assert any("parameters" in t for t in tags), f"{md.name}: no parameters cell"
        assert any("nbval-check-output" in t for t in tags), \
            f"{md.name}: no nbval-check-output cell"
        src = "".join(c.source for c in cells if "parameters" in
                      c.metadata.get("tags", []))
        for name in ("profile", "seed", "device", "output_dir"):
            assert f"{name} =" in src, f"{md.name}: parameters lack {name}"


def test_chapters_and_golden_notebooks_in_sync():
    problems = build_book.sync_problems()
    assert not problems, "\n".join(problems)


def test_no_md_and_ipynb_side_by_side():
    book = ROOT / "book"
    twins = {p.stem for p in book.glob("*.md")} & {p.stem for p in book.glob("*.ipynb")}
    assert not twins, f"book/ holds both .md and .ipynb for {twins}"


def test_golden_book_renders_without_warnings(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "build_book.py"),
           "render-golden", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    html = tmp_path / "_build" / "html"
    assert (html / "index.html").exists()
    for md in build_book.chapters():
        page = html / "book" / f"{md.stem}.html"
        assert page.exists(), f"{page} missing"
