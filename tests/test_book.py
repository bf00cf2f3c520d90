"""The book as a whole: chapters and golden notebooks agree, and the golden
notebooks render with Jupyter Book 1.x with warnings as errors."""
import re
import sys
from pathlib import Path

import nbformat
import pytest

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


def test_golden_book_renders_without_warnings(golden_render):
    assert golden_render.proc.returncode == 0, golden_render.log_tail()
    html = golden_render.html
    assert (html / "index.html").exists()
    for md in build_book.chapters():
        page = html / "book" / f"{md.stem}.html"
        assert page.exists(), f"{page} missing"


def test_the_book_ships_its_mathjax_and_loads_nothing_from_outside(golden_render):
    """Every page that has math loads the MathJax in _static; no page names
    a script, style or image outside the book (the browser test checks the
    requests themselves)."""
    html = golden_render.html
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    outside = re.compile(r'<(script|link|img|iframe|source)\b[^>]*\b(src|href)="'
                         r'(https?:)?//[^"]*"')
    with_math = 0
    for page in html.rglob("*.html"):
        text = page.read_text()
        hits = [m.group(0) for m in outside.finditer(text)
                if not re.search(r'rel="(canonical|alternate|next|prev)"', m.group(0))]
        assert not hits, f"{page.relative_to(html)} loads from outside: {hits[:3]}"
        if 'class="math' in text:
            with_math += 1
            assert "_static/mathjax/tex-chtml.js" in text, page
    assert with_math >= 10


def test_the_api_page_links_docstrings_to_their_sections(golden_render):
    page = golden_render.html / "book" / "api.html"
    assert page.is_file(), "book/api.md did not render"
    text = page.read_text()
    assert ":ref:" not in text, "a :ref: in a docstring was not resolved"
    for target in ("gaussian.html#sec-gaussian", "jvp_diagnostics.html#sec-jvp-diagnostics",
                   "index.html#sec-how-to-run"):
        assert f'href="{target}"' in text, f"no link to {target} on the API page"
    assert 'id="flowjac.engine.jvp.flow_jvp"' in text


def _pair_copy(tmp_path, stem="gaussian"):
    md, gold = tmp_path / f"{stem}.md", tmp_path / f"{stem}.ipynb"
    md.write_text((ROOT / "book" / f"{stem}.md").read_text())
    gold.write_text((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
    return md, gold


def test_pair_carries_a_prose_edit_and_keeps_the_outputs(tmp_path):
    md, gold = _pair_copy(tmp_path)
    before = nbformat.read(gold, as_version=4)
    marker = "A sentence added by the pairing test."
    lines = md.read_text().splitlines(keepends=True)
    title = next(i for i, line in enumerate(lines) if line.startswith("# "))
    lines.insert(title + 1, f"\n{marker}\n")
    md.write_text("".join(lines))
    assert build_book.pair(md, gold) is True
    after = nbformat.read(gold, as_version=4)
    assert any(marker in c.source for c in after.cells if c.cell_type == "markdown")
    code_b = [c for c in before.cells if c.cell_type == "code"]
    code_a = [c for c in after.cells if c.cell_type == "code"]
    assert len(code_a) == len(code_b) and sum(len(c.outputs) for c in code_b) > 0
    for a, b in zip(code_a, code_b):
        assert a.source == b.source
        assert a.outputs == b.outputs and a.execution_count == b.execution_count
    assert "papermill" not in after.metadata
    assert "text_representation" not in after.metadata.get("jupytext", {})
    assert after.metadata["kernelspec"]["name"] == "python3"
    assert build_book.pair(md, gold) is False        # nothing left to carry


def test_pair_refuses_a_code_edit(tmp_path):
    md, gold = _pair_copy(tmp_path)
    before = gold.read_text()
    first = next(c.source for c in build_book.read_md(md).cells if c.cell_type == "code")
    text = md.read_text()
    assert first in text
    md.write_text(text.replace(first, first + "\nx_added_by_the_test = 1", 1))
    with pytest.raises(SystemExit, match="make golden CH=gaussian"):
        build_book.pair(md, gold)
    assert gold.read_text() == before


def test_jupytext_pairs_chapters_with_golden_notebooks():
    """jupytext.toml pairs book/X.md with notebooks/X.ipynb, both ways."""
    import subprocess

    def paired(path):
        proc = subprocess.run([sys.executable, "-m", "jupytext", "--paired-paths", str(path)],
                              capture_output=True, text=True, cwd=ROOT)
        return {Path(line.strip()) for line in proc.stdout.splitlines() if line.strip()}

    md, nb = ROOT / "book" / "gaussian.md", ROOT / "notebooks" / "gaussian.ipynb"
    assert paired(md) == {nb}
    assert paired(nb) == {md}


def test_papermills_parameters_cell_is_kept_off_the_page():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("profile = 'quick'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("# Parameters\nprofile = 'full'",
                                          metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("x = 1")]
    out = build_book._hide_tooling(nb)
    assert out.cells[1].metadata["tags"] == ["injected-parameters", "remove-cell"]
    assert out.cells[0].metadata["tags"] == ["parameters"]
    assert "tags" not in out.cells[2].metadata
    assert build_book._hide_tooling(out).cells[1].metadata["tags"].count("remove-cell") == 1
