"""The rendered book in headless Chromium at 390 px and 1,400 px, offline, as a reader sees it.

The golden book (rendered once per session, tests/conftest.py) is served
from 127.0.0.1 to a browser that resolves no other host, and every page of
``_toc.yml`` is checked by ``tools/check_pages.py`` at a phone's width and
a desktop's: math typeset (no raw TeX, no MathJax errors), images loaded
with meaningful alt text, no build paths or tracebacks, nothing wider than
the page or spilling out of the text column (inline code included), no
display math, outputs or tables wider than the column (on the phone, math
and tables may scroll in their own box), every character drawn by an
installed font (no empty boxes), no papermill parameters cell, nothing
loaded from outside the book, and every page reachable from the sidebar.
At each width the sidebar, page-contents and search buttons are pressed,
and what they open must be seen and used. Deliberately broken pages show
that each check can fail.
"""
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import check_pages  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    drv = check_pages.start_browser(width=1400)   # fails clearly without chromium
    yield drv
    drv.quit()


def test_every_page_of_the_golden_book_reads_well(golden_render, browser):
    html = golden_render.html
    assert (html / "book" / "index.html").is_file(), (
        "the golden book did not render:\n" + golden_render.log_tail())
    pages = check_pages.toc_pages(ROOT / "_toc.yml")
    start = time.perf_counter()
    problems, stats = check_pages.check_site(html, pages, drv=browser,
                                             extra=check_pages.SPECIAL_PAGES)
    secs = time.perf_counter() - start
    # the checks ran on every page, and math was there to be typeset
    built = [p for p in pages if (html / p).is_file()]
    for width in check_pages.WIDTHS:
        at = [s["page"] for s in stats if s and s["width"] == width]
        assert at[:len(pages)] == built, width
        assert "search.html" in at, width
    assert sum(s["math_total"] for s in stats) > 1000
    report = "\n".join(str(p) for p in problems)
    assert not problems, f"{len(problems)} problems on the pages:\n{report}"
    assert secs < 120, f"the browser check took {secs:.0f} s (goal: under 120 s)"


BROKEN_INDEX = """<!DOCTYPE html><html><head><meta charset="utf-8">
<script src="https://cdn.example.invalid/mathjax/tex-chtml.js"></script>
<link rel="stylesheet" href="//fonts.example.invalid/css?family=Roboto">
</head><body>
<nav class="bd-links bd-docs-nav"><a href="index.html">Home</a></nav>
<main>
<p>An identity <span class="math notranslate nohighlight">\\(E[x] = 0\\)</span> left raw.</p>
<div class="math notranslate nohighlight">\\[\\E[x x^\\top] = \\Sigma\\]</div>
<p>Plain text with $$a + b$$ in it.</p>
<img src="missing.png" alt="A plot that is not there">
<img src="ok.png" alt="../_images/1f9e2b7c4d5a6e8f00112233445566778899aabb.png">
<img src="ok.png" alt="">
<div class="cell tag_injected-parameters"><div class="cell_input"><pre># Parameters
profile = "full"</pre></div></div>
<div class="cell"><div class="cell_output docutils container"><pre style="width: 300px; overflow-x: auto">saved to PosixPath('/work/main/_build/outputs/x/numbers.json') and a line that is much longer than three hundred pixels of monospace text</pre>
<pre>Traceback (most recent call last):
  File "/tmp/tmpab12/chapter.py", line 3, in &lt;module&gt;</pre></div></div>
<table style="display: block; width: 200px; overflow-x: auto"><tr><td style="white-space: nowrap">a very wide table cell that does not fit in two hundred pixels at all</td></tr></table>
</main></body></html>
"""

GOOD_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>
<main><p>A page with <code class="literal">_build/html</code> named in the prose,
and nothing wrong.</p><img src="ok.png" alt="A red square, the test image"></main>
</body></html>
"""

# a 2x2 red PNG
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000002000000020802000000fdd49a73"
    "0000001649444154789c63f8cfc0f09f81e13f0303c37f0600002bf805fb3d4c"
    "c8fd0000000049454e44ae426082")


def test_the_checker_fails_on_a_broken_page(tmp_path, browser):
    (tmp_path / "index.html").write_text(BROKEN_INDEX)
    (tmp_path / "good.html").write_text(GOOD_PAGE)
    (tmp_path / "ok.png").write_bytes(PNG)
    problems, stats = check_pages.check_site(tmp_path, ["index.html", "good.html"],
                                             drv=browser, widths=(1400,),
                                             navigate=False)
    by_kind = {}
    for p in problems:
        by_kind.setdefault(p.kind, []).append(p)
    text = "\n".join(map(str, problems))
    # every problem names its page; the good page has none
    assert all(p.page == "index.html" for p in problems), text
    assert stats[1]["images"] == 1
    expected = {"external-request", "external-url", "math-not-typeset", "raw-tex",
                "image-not-loaded", "image-alt", "injected-parameters",
                "build-path", "traceback", "overflow", "navigation"}
    assert expected <= set(by_kind), f"missing {expected - set(by_kind)}:\n{text}"
    # and each names the element, with a snippet of its text
    assert any("cdn.example.invalid" in p.detail for p in by_kind["external-request"])
    assert any("fonts.example.invalid" in p.detail for p in by_kind["external-url"])
    assert any("E[x] = 0" in p.detail for p in by_kind["raw-tex"])
    assert any("$$a + b$$" in p.detail for p in by_kind["raw-tex"])
    assert len(by_kind["math-not-typeset"]) == 2
    assert any("missing.png" in p.detail for p in by_kind["image-not-loaded"])
    alts = " ".join(p.detail for p in by_kind["image-alt"])
    assert "file name or path" in alts and "no alt text" in alts
    assert any("PosixPath(" in p.detail for p in by_kind["build-path"])
    assert any("/work/" in p.detail for p in by_kind["build-path"])
    assert any("/tmp/" in p.detail for p in by_kind["build-path"])
    overflow = " ".join(p.detail for p in by_kind["overflow"])
    assert "pre" in overflow and "table" in overflow and "PosixPath" in overflow
    assert "good.html" in by_kind["navigation"][0].detail


def test_the_checker_sees_mathjax_errors(tmp_path, golden_render, browser):
    """With the book's shipped MathJax and macros, an undefined macro is
    reported, and \\E and \\R (the config's macros) are not."""
    static = golden_render.html / "_static" / "mathjax"
    assert (static / "tex-chtml.js").is_file(), "MathJax is not shipped in _static"
    (tmp_path / "mathjax").symlink_to(static)
    (tmp_path / "index.html").write_text(r"""<!DOCTYPE html><html><head>
<meta charset="utf-8">
<script>window.MathJax = {"tex": {"macros": {"E": "\\mathbb{E}", "R": "\\mathbb{R}"}},
 "options": {"processHtmlClass": "math"}}</script>
<script defer src="mathjax/tex-chtml.js"></script></head><body><main>
<p>Fine: <span class="math notranslate nohighlight">\(\E[x] \in \R\)</span>.</p>
<p>Broken: <span class="math notranslate nohighlight">\(\Var[x]\)</span>.</p>
<p>Broken: <span class="math notranslate nohighlight">\(x^1^2\)</span>.</p>
</main></body></html>""")
    problems, stats = check_pages.check_site(tmp_path, ["index.html"], drv=browser,
                                             widths=(1400,), navigate=False)
    assert stats[0]["math_total"] == 3 and stats[0]["math_typeset"] == 3, stats
    assert [p.kind for p in problems] == ["math-error", "math-error"], problems
    assert "undefined macro \\Var" in problems[0].detail
    assert "error" in problems[1].detail


# A page built like the book's (the themes' class names), on which the
# sidebar, the page contents and the search open from buttons. WIRING binds
# the buttons; the broken page binds, as the themes did, only the first
# button of each kind: a hidden one, so the visible button opens nothing.
PHONE_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ margin: 0; font-family: sans-serif; }}
header {{ display: flex; gap: 8px; padding: 8px; }}
.bd-article {{ padding: 16px; }}
.panel {{ position: fixed; top: 0; left: 0; width: 280px; height: 100%;
          background: white; border-right: 1px solid; padding: 16px; }}
.panel[hidden], .hidden-btn {{ display: none; }}
section {{ min-height: 900px; }}
</style></head><body>
<header>
<button class="primary-toggle hidden-btn" aria-label="hidden sidebar">=</button>
<button class="secondary-toggle hidden-btn" aria-label="hidden contents">:</button>
<button class="primary-toggle" aria-label="Site navigation">Menu</button>
<button class="search-button__button" aria-label="Search">Search</button>
<button class="secondary-toggle" aria-label="On this page">Contents</button>
</header>
<nav class="panel bd-docs-nav" id="sidebar" hidden>
<a href="index.html">Home</a> <a href="good.html">Another page</a></nav>
<nav class="panel" id="pst-page-toc-nav" hidden><a href="#part-two">Part two</a></nav>
<dialog id="pst-search-dialog"><form action="search.html" method="get">
<input type="search" name="q" aria-label="Search the book"></form></dialog>
<main class="bd-article"><h1>Navigation checked</h1>
<p>{body}</p>
<section id="part-one"><h2>Part one</h2></section>
<section id="part-two"><h2>Part two</h2></section>
</main>
<script>
const [p0, p1] = document.querySelectorAll(".primary-toggle");
const [s0, s1] = document.querySelectorAll(".secondary-toggle");
const openPanel = (id) => () => document.getElementById(id).toggleAttribute("hidden");
{wiring}
document.querySelector(".search-button__button").onclick = () => {{
  document.getElementById("pst-search-dialog").showModal();
  document.querySelector("#pst-search-dialog input").focus();
}};
document.querySelector("#pst-page-toc-nav a").onclick = () =>
  document.getElementById("pst-page-toc-nav").setAttribute("hidden", "");
</script></body></html>
"""
WORKING = """p1.onclick = openPanel("sidebar"); s1.onclick = openPanel("pst-page-toc-nav");"""
BROKEN = """p0.onclick = openPanel("sidebar"); s0.onclick = openPanel("pst-page-toc-nav");"""
SEARCH_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><main>
<ul class="search"><li><a href="index.html">Navigation checked</a></li></ul>
</main></body></html>"""
# what fits a phone's column too, and the marks the scorecard uses, which DejaVu has
FITS = ("Verdicts: ✔ holds, ✘ fails, ? inconclusive, ⚠ provisional, — untested. "
        "The function <code class='literal'>flowjac.models.pretrained.load</code>.")
# a name that runs out of a phone's column, and an emoji that no installed font draws
SPILLS = ("Verdict: ✅ holds. The function <code class='literal' style='white-space: "
          "nowrap'>flowjac.pipelines.interventions_study.a_name_too_long_for_a_phone</code>.")


def _phone_site(path, wiring, body, drv):
    path.mkdir()
    (path / "index.html").write_text(PHONE_PAGE.format(wiring=wiring, body=body))
    (path / "good.html").write_text(GOOD_PAGE)
    (path / "ok.png").write_bytes(PNG)
    (path / "search.html").write_text(SEARCH_PAGE)
    return check_pages.check_site(path, ["index.html", "good.html"], drv=drv)


def test_the_toggles_are_pressed_at_both_widths(tmp_path, browser):
    """A page whose visible buttons open the sidebar, the contents and the
    search passes at 390 px and 1,400 px; the same page with the buttons
    bound to hidden twins (the themes' bug), a name that spills out of a
    phone's column and an emoji mark fails, each at the width it fails at."""
    problems, stats = _phone_site(tmp_path / "working", WORKING, FITS, browser)
    assert not problems, "\n".join(map(str, problems))
    assert {s["width"] for s in stats} == set(check_pages.WIDTHS)

    problems, _ = _phone_site(tmp_path / "broken", BROKEN, SPILLS, browser)
    text = "\n".join(map(str, problems))
    found = {(p.kind, p.width, p.detail.split(":")[0][:40]) for p in problems}
    for width in check_pages.WIDTHS:
        nav = [p.detail for p in problems if p.kind == "navigation" and p.width == width]
        assert any("opened no sidebar links" in d for d in nav), text
        assert any("opened no page contents" in d for d in nav), text
        # the mark has no glyph at either width
        assert any(p.kind == "missing-glyph" and p.width == width and "U+2705" in p.detail
                   for p in problems), text
    # the long name spills out of the column and widens the page on the phone only
    spills = [p for p in problems if p.kind == "overflow"]
    assert any("interventions_study" in p.detail and "spills" in p.detail
               for p in spills if p.width == 390), text
    assert any("the page is" in p.detail for p in spills if p.width == 390), text
    assert not [p for p in spills if p.width == 1400], text
    # the search still works on the broken page, and the good page has no problem
    assert not any("search" in p.detail for p in problems), text
    assert all(p.page == "index.html" for p in problems), found


def test_bad_alt_texts():
    assert check_pages.bad_alt("", "a.png") == "no alt text"
    assert "file name" in check_pages.bad_alt("../_images/ab12.png", "../_images/ab12.png")
    assert "file name" in check_pages.bad_alt("ab12cd", "x/ab12cd.png")
    assert "hash" in check_pages.bad_alt("5fe2399542f056ad1160f740967cd046", "x.png")
    assert "says nothing" in check_pages.bad_alt("png", "x.png")
    assert "file name" in check_pages.bad_alt("outputs/fig.png", "x.png")
    assert check_pages.bad_alt("Two panels of curves against time", "x.png") is None
    assert check_pages.bad_alt("Paths that bow towards zero at t = 1/2", "x.png") is None


def test_the_script_refuses_a_missing_directory(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "check_pages.py"),
                           str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "is not a directory" in proc.stderr
