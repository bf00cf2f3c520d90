"""Check a built HTML book in headless Chromium, the way a reader sees it.

Usage:

    python tools/check_pages.py _build/html            # the pages of _toc.yml
    python tools/check_pages.py DIR --all              # every page under DIR
    python tools/check_pages.py DIR --width 390 --json report.json

The book is served from 127.0.0.1 and the browser can resolve no other host
(the reader is offline), and every page is checked at 390 px (a phone) and
1,400 px (a desktop; ``--width``, repeatable, picks others) for:

* requests to anything outside the book (scripts, styles, fonts, images,
  loaders; from the network log, and ``src``/``href`` of the HTML);
* math: every ``.math`` element typeset by MathJax, no MathJax error
  (``mjx-merror``, e.g. an undefined macro), and no raw TeX (``\\(``,
  ``\\[``, ``$$``) in text outside code;
* images: every ``<img>`` loaded (``naturalWidth > 0``) with alt text that
  says something (not empty, not a file name, path or hash);
* no build paths and no tracebacks in the text of the page: ``/work/``,
  ``/tmp/``, ``PosixPath(`` and ``Traceback (most recent call last)``
  anywhere; a relative ``_build/`` in cell outputs and in prose outside code
  (the cells' source and prose code literals may name the layout, e.g. the
  default ``output_dir`` ``_build/outputs/<chapter>``);
* no horizontal overflow: the page never scrolls sideways; no element
  (inline code, a long name, inline math) spills out of the text column
  unless a box that scrolls holds it; no box cuts its content off; display
  math, cell outputs' ``<pre>`` and tables fit the column (below 720 px,
  display math and tables may scroll inside their own box instead);
* glyphs: every character of the text is drawn by an installed font, not
  as the empty box of a missing glyph (e.g. emoji without an emoji font);
* no papermill ``injected-parameters`` cell on the page;
* navigation: every page is linked from the sidebar of the first page, and
  at each width, on the first page and the first with a contents list, the
  visible sidebar, page-contents and search buttons are pressed: what they
  open must be on screen and usable (a sidebar link followed to its page,
  a contents link to its section, left uncovered; the search box focused
  and listing results for a word of the title); a sidebar shown beside the
  page must hide and come back with its button.

Each problem names the page, what is wrong and a snippet of the element.
Needs ``chromium`` and ``chromium-driver`` (Debian packages; ``make
browser`` installs them) and the ``selenium`` package.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import posixpath
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

ROOT = Path(__file__).resolve().parent.parent
SPECIAL_PAGES = ["genindex.html", "search.html", "py-modindex.html"]
BUILD_PATHS = ("/work/", "/tmp/", "_build/", "PosixPath(", "WindowsPath(")
TRACEBACK = "Traceback (most recent call last)"


WIDTHS = (390, 1400)      # a phone (iPhone 12-15) and a desktop window
PHONE = 720               # below this width, wide math and tables may scroll in their box
# what the reader presses and what it must open (pydata-sphinx-theme and
# sphinx-book-theme markup)
SIDEBAR_TOGGLE = ".primary-toggle"
SIDEBAR_LINKS = ".bd-docs-nav a[href]"
TOC_TOGGLE = ".secondary-toggle"
PAGE_TOC_LINKS = "#pst-page-toc-nav a[href], .bd-toc-nav a[href], nav.page-toc a[href]"
SEARCH_BUTTON = ".search-button__button, .search-button"
SEARCH_INPUT = "input[name=q]"


@dataclass(frozen=True)
class Problem:
    page: str       # path of the page relative to the html dir
    kind: str       # what is wrong: "raw-tex", "image", "overflow", ...
    detail: str     # the element and a snippet of its text
    width: int = 0  # the window width it was seen at (0: any)

    def __str__(self):
        at = f" at {self.width}px" if self.width else ""
        return f"{self.page}{at}: {self.kind}: {self.detail}"


# Runs in the page once it has loaded, MathJax has typeset and fonts are in.
# Returns plain data; the Python side turns it into Problems.
_PAGE_JS = r"""
const done = arguments[arguments.length - 1];
const BUILD_PATHS = arguments[0], TRACEBACK = arguments[1], SCROLL_OK = arguments[2],
      PAGE_TOC_LINKS = arguments[3];
const snip = (s, n = 90) => (s || "").replace(/\s+/g, " ").trim().slice(0, n);
const describe = (el) => {
  let d = el.tagName.toLowerCase();
  if (el.id) d += "#" + el.id;
  const cls = (el.getAttribute("class") || "").trim().split(/\s+/).filter(Boolean);
  if (cls.length) d += "." + cls.slice(0, 3).join(".");
  return d;
};
const inCode = (node) => {
  const el = node.nodeType === 1 ? node : node.parentElement;
  return !!(el && el.closest(
    "pre, code, kbd, samp, tt, script, style, textarea, noscript, " +
    "mjx-container, .highlight, .MathJax"));
};
function check() {
  const out = {raw_tex: [], merror: [], untypeset: [], images: [],
               paths: [], overflow: [], page_overflow: [], glyphs: [],
               injected: [], links: [], toc_links: 0, scrolls: 0,
               static_urls: [], math_total: 0, math_typeset: 0};
  const main = document.querySelector("main, article, [role=main]") || document.body;

  // math
  const maths = Array.from(document.querySelectorAll(".math"));
  out.math_total = maths.length;
  for (const m of maths) {
    if (m.querySelector("mjx-container") || m.tagName.toLowerCase() === "mjx-container") {
      out.math_typeset += 1;
    } else {
      out.untypeset.push(describe(m) + ": " + snip(m.textContent));
    }
  }
  // MathJax errors: merror nodes, and undefined macros, which MathJax's
  // noundefined package typesets as red text instead of failing
  const doc = window.MathJax && MathJax.startup && MathJax.startup.document;
  if (doc && doc.math) {
    for (const item of doc.math) {
      const bad = [];
      if (item.root && item.root.walkTree) {
        item.root.walkTree((node) => {
          if (node.isKind && node.isKind("merror")) {
            bad.push("error: " + snip(node.attributes.get("data-mjx-error") || "", 60));
          } else if (node.isKind && node.isKind("mtext") &&
                     node.attributes.get("mathcolor") === "red") {
            const t = node.childNodes.map(c => c.text || "").join("");
            if (t.startsWith("\\")) bad.push("undefined macro " + t);
          }
        });
      }
      for (const b of bad) out.merror.push(b + " in " + snip(item.math, 60));
    }
  } else {
    for (const e of document.querySelectorAll("mjx-merror")) {
      out.merror.push(snip(e.getAttribute("data-mjx-error") || e.textContent));
    }
  }
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const t = n.nodeValue;
    if (!t || inCode(n)) continue;
    for (const pat of ["\\(", "\\[", "$$", "\\begin{"]) {
      const i = t.indexOf(pat);
      if (i >= 0) {
        out.raw_tex.push(describe(n.parentElement) + ": " +
                         snip(t.slice(Math.max(0, i - 30), i + 60)));
        break;
      }
    }
  }

  // images
  for (const img of document.images) {
    const src = img.getAttribute("src") || "";
    const alt = (img.getAttribute("alt") || "").trim();
    out.images.push({src: src, alt: alt, loaded: img.complete && img.naturalWidth > 0,
                     width: img.naturalWidth});
  }

  // build paths and tracebacks in the text a reader sees: absolute paths,
  // PosixPath reprs and tracebacks anywhere; a relative _build/ only where
  // a program printed it (outputs) or in prose outside code literals (the
  // prose and the cells' source may name the layout, e.g. _build/html)
  const hits = (text, pats, where) => {
    for (const pat of pats) {
      let from = 0, k = 0;
      while (k < 5) {
        const i = text.indexOf(pat, from);
        if (i < 0) break;
        from = i + pat.length; k += 1;
        out.paths.push({pat: pat, where: where,
                        snippet: snip(text.slice(Math.max(0, i - 40), i + 60))});
      }
    }
  };
  const absolute = BUILD_PATHS.filter(p => p !== "_build/").concat([TRACEBACK]);
  hits(document.body.innerText, absolute, "page");
  for (const o of main.querySelectorAll(".cell_output, .output")) {
    if (!o.parentElement.closest(".cell_output, .output")) hits(o.innerText, ["_build/"], describe(o));
  }
  const w2 = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  for (let n = w2.nextNode(); n; n = w2.nextNode()) {
    const el = n.parentElement;
    if (!el || el.closest(".cell, pre, code, script, style")) continue;
    hits(n.nodeValue || "", ["_build/"], describe(el));
  }

  // horizontal overflow. (1) The page must not scroll sideways. (2) No
  // element may spill out of the text column (inline code, a long word, an
  // image) unless a box that scrolls or clips sideways holds it. (3) Display
  // math, outputs and tables must fit the column; on a phone (SCROLL_OK)
  // display math and tables may scroll inside their own box instead,
  // printed outputs never (they wrap). (4) No box may cut its content off.
  const root = document.documentElement;
  if (root.scrollWidth > root.clientWidth + 1) {
    out.page_overflow.push("the page is " + root.scrollWidth + "px wide in a " +
                           root.clientWidth + "px window");
  }
  const column = document.querySelector(".bd-article") || main;
  const colRect = column.getBoundingClientRect();
  const holds = (el) => {      // a box between el and the column scrolls or clips
    for (let a = el.parentElement; a && a !== column; a = a.parentElement) {
      const cs = getComputedStyle(a);
      if (cs.overflowX !== "visible" && cs.display !== "inline") return true;
    }
    return false;
  };
  const spilled = [];
  for (const el of column.querySelectorAll("*")) {
    if (spilled.some(s => s.contains(el))) continue;
    const cs = getComputedStyle(el);
    if (cs.display === "none" || cs.position === "fixed" || cs.visibility === "hidden") continue;
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height) continue;
    const over = Math.max(r.right - colRect.right, colRect.left - r.left);
    if (over > 1 && !holds(el)) {
      spilled.push(el);
      out.overflow.push(describe(el) + " spills " + Math.round(over) + "px out of the " +
                        Math.round(colRect.width) + "px column: " + snip(el.textContent, 90));
    }
  }
  const sel = ["div.math", "mjx-container[display]", ".cell_output pre",
               ".output pre", "table", ".pst-scrollable-table-container"];
  const seen = new Set();
  for (const el of document.querySelectorAll(sel.join(", "))) {
    if (seen.has(el)) continue;
    seen.add(el);
    const cs = getComputedStyle(el);
    if (cs.display === "inline" || cs.display === "none") continue;
    if (el.scrollWidth > el.clientWidth + 1) {
      if (SCROLL_OK && el.tagName !== "PRE" && ["auto", "scroll"].includes(cs.overflowX)) {
        out.scrolls += 1;
        continue;
      }
      // name the widest line of a <pre>, where the fix is
      const text = el.tagName === "PRE" ? el.textContent.split("\n")
        .reduce((a, b) => (b.length > a.length ? b : a), "") : el.textContent;
      out.overflow.push(describe(el) + " " + el.scrollWidth + "px in " +
                        el.clientWidth + "px: " + snip(text, 90));
    }
  }
  for (const el of column.querySelectorAll("*")) {
    const cs = getComputedStyle(el);      // (overflow does not apply to inline boxes)
    if ((cs.overflowX === "hidden" || cs.overflowX === "clip") && cs.display !== "inline" &&
        el.scrollWidth > el.clientWidth + 1 && !el.closest("mjx-container")) {
      // what is drawn beyond its edges (MathJax's assistive MathML, clipped
      // to nothing for screen readers, makes scrollWidth larger than what shows)
      const r = el.getBoundingClientRect();
      let cut = 0;
      for (const k of el.querySelectorAll("*")) {
        if (k.closest("mjx-assistive-mml")) continue;
        const kr = k.getBoundingClientRect();
        if (kr.width && kr.height) cut = Math.max(cut, kr.right - r.right, r.left - kr.left);
      }
      if (cut > 1) {
        out.overflow.push(describe(el) + " cuts off " + Math.round(cut) + "px: " +
                          snip(el.textContent, 90));
      }
    }
  }

  // glyphs: every character of the page's text drawn by an installed font,
  // not as the empty box of a missing glyph (the box that U+10FFFD, which
  // no font has, is drawn as)
  const canvas = document.createElement("canvas");
  canvas.width = 64; canvas.height = 64;
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  const ink = (ch, family) => {
    ctx.clearRect(0, 0, 64, 64);
    ctx.font = "40px " + family;
    ctx.fillText(ch, 4, 48);
    return ctx.getImageData(0, 0, 64, 64).data.join(",");
  };
  const boxes = new Map(), tested = new Map();
  const w3 = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = w3.nextNode(); n; n = w3.nextNode()) {
    const el = n.parentElement;
    if (!el || el.closest("script, style, noscript, mjx-container, .MathJax")) continue;
    const family = getComputedStyle(el).fontFamily;
    for (const ch of new Set(n.nodeValue || "")) {
      if (ch.codePointAt(0) < 0x2000 || /\s/.test(ch)) continue;
      const key = ch + "\u0000" + family;
      if (!tested.has(key)) {
        if (!boxes.has(family)) boxes.set(family, ink("\u{10FFFD}", family));
        tested.set(key, ink(ch, family) === boxes.get(family));
        if (tested.get(key)) {
          const i = n.nodeValue.indexOf(ch);
          out.glyphs.push("U+" + ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0") +
                          " " + ch + " in " + describe(el) + ": " +
                          snip(n.nodeValue.slice(Math.max(0, i - 30), i + 30)));
        }
      }
    }
  }

  for (const el of document.querySelectorAll(".tag_injected-parameters")) {
    out.injected.push(describe(el) + ": " + snip(el.textContent));
  }

  for (const a of document.querySelectorAll(".bd-docs-nav a[href], .bd-sidebar-primary a[href], nav.bd-links a[href]")) {
    out.links.push(a.href);
  }
  out.toc_links = document.querySelectorAll(PAGE_TOC_LINKS).length;
  const attrs = [["script", "src"], ["link", "href"], ["img", "src"],
                 ["iframe", "src"], ["source", "src"], ["video", "src"],
                 ["audio", "src"], ["embed", "src"], ["object", "data"]];
  for (const [tag, attr] of attrs) {
    for (const el of document.querySelectorAll(tag + "[" + attr + "]")) {
      if (tag === "link" && /\b(canonical|alternate|next|prev|index|search|author|license)\b/i
          .test(el.getAttribute("rel") || "")) continue;
      out.static_urls.push(tag + " " + attr + "=" + el.getAttribute(attr));
    }
  }
  return out;
}
const ready = () => new Promise(resolve => {
  if (document.readyState === "complete") resolve();
  else window.addEventListener("load", resolve);
});
const mathjax = () => (window.MathJax && window.MathJax.startup &&
                       window.MathJax.startup.promise) || Promise.resolve();
ready().then(mathjax).then(() => document.fonts ? document.fonts.ready : null)
  .then(() => done(check()), (err) => done({error: String(err)}));
"""

_HASH_CHARS = set("0123456789abcdef")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".bmp")


def bad_alt(alt: str, src: str) -> str | None:
    """Why ``alt`` is not a meaningful description of an image, or None."""
    a = alt.strip()
    if not a:
        return "no alt text"
    low = a.lower()
    name = posixpath.basename(urlsplit(src).path).lower()
    stem = posixpath.splitext(name)[0]
    pathlike = (" " not in a and ("/" in a or "\\" in a)) or \
        a.startswith(("../", "./", "/")) or "_images/" in a
    if low in (name, stem) or low.endswith(_IMAGE_EXT) or pathlike:
        return f"alt text is a file name or path ({a[:60]!r})"
    word = low.replace("-", "").replace("_", "")
    if len(word) >= 12 and set(word) <= _HASH_CHARS:
        return f"alt text is a hash ({a[:60]!r})"
    if len(a) < 4 or low in ("image", "figure", "png", "plot", "output", "img"):
        return f"alt text says nothing ({a!r})"
    return None


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Server:
    """Serve a directory on 127.0.0.1 (an unused port) in a thread."""

    def __init__(self, root: Path):
        handler = functools.partial(_Quiet, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def find_browser() -> tuple[str, str]:
    """Paths of the Chromium binary and its chromedriver, or one clear error."""
    browser = os.environ.get("CHROMIUM") or next(
        (p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                     shutil.which("google-chrome")) if p), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    if not browser or not driver:
        raise RuntimeError(
            "headless Chromium is needed to check the pages: install the Debian "
            "packages chromium and chromium-driver (`make browser`), or set "
            f"CHROMIUM and CHROMEDRIVER (found browser={browser}, driver={driver})")
    return browser, driver


def start_browser(width: int = 1400, height: int | None = None):
    """A headless Chromium that can reach 127.0.0.1 only, logging requests."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:
        raise RuntimeError("the selenium package is needed (requirements.txt)") from err
    browser, driver = find_browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--disable-extensions",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--force-device-scale-factor=1",
                f"--window-size={width},{height or 1000}",
                # offline: no host but the book's server resolves
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    drv.set_page_load_timeout(60)
    drv.set_script_timeout(60)
    # the layout viewport must be `width` wide, whatever the window chrome
    set_width(drv, width, height)
    return drv


def _requests(drv) -> list[str]:
    urls = []
    for entry in drv.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def _is_local(url: str, base: str) -> bool:
    return url.startswith(base) or url.split(":", 1)[0] in ("data", "blob", "about")


def _is_redirect(path: Path) -> bool:
    head = path.read_text(errors="replace")[:2000].lower()
    return 'http-equiv="refresh"' in head and "<body" not in head


def toc_pages(toc: Path) -> list[str]:
    """The html pages of a ``_toc.yml`` (root first), relative to the html dir."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from build_book import toc_files     # one reading of _toc.yml for the build and the check

    return [f + ".html" for f in toc_files(toc)]


def all_pages(html: Path) -> list[str]:
    pages = []
    for p in sorted(html.rglob("*.html")):
        rel = p.relative_to(html).as_posix()
        if rel.split("/")[0] in ("_static", "_sources", "_images") or \
                _is_redirect(p):
            continue
        pages.append(rel)
    return pages


def check_page(drv, base: str, page: str, width: int = 1400) -> tuple[list[Problem], dict]:
    """Load one page at ``width`` and return its problems and its counts."""
    drv.get_log("performance")          # drop what earlier pages logged
    start = time.perf_counter()
    drv.get(urljoin(base, page))
    res = drv.execute_async_script(_PAGE_JS, list(BUILD_PATHS), TRACEBACK,
                                   width < PHONE, PAGE_TOC_LINKS)
    secs = time.perf_counter() - start
    probs: list[Problem] = []
    if not isinstance(res, dict) or "error" in res:
        return [Problem(page, "script", f"the checks did not run: {res}", width)], {}
    add = lambda kind, detail: probs.append(Problem(page, kind, detail, width))  # noqa: E731
    for url in _requests(drv):
        if not _is_local(url, base):
            add("external-request", url)
    for item in res["static_urls"]:
        url = item.split("=", 1)[1]
        if url.startswith(("http:", "https:", "//")) and not url.startswith(base):
            add("external-url", item)
    for s in res["untypeset"]:
        add("math-not-typeset", s)
    for s in res["merror"]:
        add("math-error", s)
    for s in res["raw_tex"]:
        add("raw-tex", s)
    for img in res["images"]:
        if not img["loaded"]:
            add("image-not-loaded", f"img src={img['src']} alt={img['alt'][:60]!r}")
        why = bad_alt(img["alt"], img["src"])
        if why:
            add("image-alt", f"img src={img['src']}: {why}")
    for hit in res["paths"]:
        pat, snippet = hit["pat"], hit["snippet"]
        add("traceback" if pat == TRACEBACK else "build-path",
            f"{pat!r} in {hit['where']}: {snippet}")
    for s in res["page_overflow"] + res["overflow"]:
        add("overflow", s)
    for s in res["glyphs"]:
        add("missing-glyph", s)
    for s in res["injected"]:
        add("injected-parameters", s)
    stats = {"page": page, "math_total": res["math_total"],
             "math_typeset": res["math_typeset"], "images": len(res["images"]),
             "seconds": round(secs, 2), "links": res["links"], "width": width,
             "toc_links": res["toc_links"], "scrolls": res["scrolls"]}
    return probs, stats


# The elements matching a selector that a reader can see and press: on
# screen, not hidden, and the element the browser hits at their centre.
_USABLE_JS = r"""
const usable = (el) => {
  const r = el.getBoundingClientRect();
  if (r.width < 1 || r.height < 1) return false;
  if (getComputedStyle(el).visibility === "hidden") return false;
  if (r.right <= 0 || r.left >= innerWidth || r.bottom <= 0 || r.top >= innerHeight) return false;
  const x = Math.min(Math.max(r.left + r.width / 2, 0), innerWidth - 1);
  const y = Math.min(Math.max(r.top + r.height / 2, 0), innerHeight - 1);
  const hit = document.elementFromPoint(x, y);
  return !!hit && (hit === el || el.contains(hit));
};
return Array.from(document.querySelectorAll(arguments[0])).filter(usable);
"""


def _usable(drv, selector: str) -> list:
    return drv.execute_script(_USABLE_JS, selector)


def _wait(predicate, timeout: float = 3.0):
    """Poll ``predicate`` until it returns something truthy or time is up."""
    end = time.monotonic() + timeout
    while True:
        got = predicate()
        if got or time.monotonic() > end:
            return got
        time.sleep(0.1)


def _describe(el) -> str:
    label = (el.get_attribute("aria-label") or el.get_attribute("title") or
             el.text or "").strip()
    return f"{el.tag_name}.{'.'.join((el.get_attribute('class') or '').split()[:3])} {label!r}"


def _press(drv, selector: str):
    """Press the first control matching ``selector`` that a reader can see; None if none."""
    controls = _usable(drv, selector)
    if not controls:
        return None
    controls[0].click()
    return controls[0]


def _search_word(drv) -> str:
    """A word of the page's title to search for (its longest)."""
    title = drv.execute_script(
        "const h = document.querySelector('main h1, article h1, h1');"
        "return h ? h.textContent : document.title;") or ""
    words = ["".join(c for c in w if c.isalpha()) for w in title.split()]
    return max(words, key=len, default="") or "the"


def check_navigation(drv, base: str, page: str, width: int,
                     page_toc: bool = True) -> list[Problem]:
    """Press the sidebar, page-contents and search controls of ``page``.

    Each must open something a reader can see and use at ``width``: the
    sidebar's links (one is followed to its page), the page's contents (a
    link is followed and its section is shown, not covered), and a search
    box that has the focus and, given a word of the title, lists results.
    Where the sidebar is already shown, its button must hide and show it.
    ``page_toc`` False: the page has no contents list to open.
    """
    url = urljoin(base, page)
    probs: list[Problem] = []
    add = lambda kind, detail: probs.append(Problem(page, kind, detail, width))  # noqa: E731

    def load():
        drv.get(url)
        drv.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "if (document.readyState === 'complete') done();"
            "else window.addEventListener('load', () => done());")

    def follow(link, what):
        """Press a link; its page or section must come into view."""
        href = link.get_attribute("href") or ""
        link.click()
        target = urlsplit(href)
        if target.fragment:
            frag = unquote(target.fragment)
            shown = _wait(lambda: drv.execute_script(
                "return location.hash.slice(1) === arguments[0]", frag) and _usable(
                drv, f"[id={json.dumps(frag)}] > :is(h1,h2,h3,h4,h5,h6), "
                     f":is(h1,h2,h3,h4,h5,h6)[id={json.dumps(frag)}], "
                     f"[id={json.dumps(frag)}] > :is(h1,h2,h3,h4,h5,h6) a"))
            if not shown:
                add("navigation", f"{what}: the link to #{frag} does not show its "
                    "section (not scrolled to, or still covered)")
        elif not _wait(lambda: drv.current_url.split("#")[0] == href.split("#")[0]):
            add("navigation", f"{what}: following {href} stayed on {drv.current_url}")

    # the sidebar
    load()
    if _usable(drv, SIDEBAR_LINKS):
        button = _press(drv, SIDEBAR_TOGGLE)
        if button is not None:
            if not _wait(lambda: not _usable(drv, SIDEBAR_LINKS)):
                add("navigation", f"pressing {_describe(button)} does not hide the sidebar")
            else:
                _press(drv, SIDEBAR_TOGGLE)
                if not _wait(lambda: _usable(drv, SIDEBAR_LINKS)):
                    add("navigation", "pressing the sidebar button again does not bring "
                        "the sidebar back")
    else:
        button = _press(drv, SIDEBAR_TOGGLE)
        if button is None:
            add("navigation", "the sidebar is hidden and no visible button opens it")
        elif not _wait(lambda: _usable(drv, SIDEBAR_LINKS)):
            add("navigation", f"pressing {_describe(button)} opened no sidebar links")
    links = [a for a in _usable(drv, SIDEBAR_LINKS)
             if urlsplit(a.get_attribute("href") or "").path != urlsplit(url).path]
    if links:
        follow(links[-1], "sidebar")

    # the page's contents
    if page_toc:
        load()
        if not _usable(drv, PAGE_TOC_LINKS):
            button = _press(drv, TOC_TOGGLE)
            if button is None:
                add("navigation", "the page contents are hidden and no visible button "
                    "opens them")
            elif not _wait(lambda: _usable(drv, PAGE_TOC_LINKS)):
                add("navigation", f"pressing {_describe(button)} opened no page contents")
        links = _usable(drv, PAGE_TOC_LINKS)
        if links:
            follow(links[len(links) // 2], "page contents")

    # search
    load()
    button = _press(drv, SEARCH_BUTTON)
    if button is None:
        add("navigation", "no visible search button")
        return probs
    box = _wait(lambda: [el for el in _usable(drv, SEARCH_INPUT)
                         if drv.execute_script("return document.activeElement === arguments[0]", el)])
    if not box:
        add("navigation", f"pressing {_describe(button)} opened no search box with the focus")
        return probs
    from selenium.webdriver.common.keys import Keys

    word = _search_word(drv)
    box[0].send_keys(word + Keys.ENTER)
    found = _wait(lambda: urlsplit(drv.current_url).path.endswith("search.html") and
                  _usable(drv, "#search-results li a, ul.search li a"), timeout=10)
    if not found:
        add("navigation", f"searching for {word!r} listed no results "
            f"(at {drv.current_url})")
    return probs


def set_width(drv, width: int, height: int | None = None) -> None:
    """Lay pages out in a window ``width`` px wide (a phone's height below 720 px)."""
    height = height or (844 if width < PHONE else 1000)
    drv.set_window_size(width, height)
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1,
                         "mobile": False})


def check_site(html: Path, pages: list[str] | None = None, width: int | None = None,
               drv=None, extra: list[str] = (), widths: tuple[int, ...] = WIDTHS,
               navigate: bool = True) -> tuple[list[Problem], list[dict]]:
    """Check ``pages`` (default: every page) of the built book in ``html``.

    Every page is checked at each of ``widths`` (``width``: one width
    only). The first page is the index whose sidebar must link to every
    other page; ``extra`` pages (e.g. ``search.html``) are checked too but
    need no sidebar link. With ``navigate``, at each width the sidebar,
    page-contents and search controls are pressed (``check_navigation``) on
    the first page and on the first other page that has a contents list.
    Returns the problems and per-page counts (width, math items, typeset
    math items, images, boxes that scroll, seconds).
    """
    html = Path(html).resolve()
    if not html.is_dir():
        raise FileNotFoundError(f"no html directory {html}")
    widths = (width,) if width else tuple(widths)
    pages = list(pages) if pages is not None else all_pages(html)
    missing = [p for p in pages if not (html / p).is_file()]
    problems = [Problem(p, "missing-page", f"{html / p} does not exist") for p in missing]
    pages = [p for p in pages if p not in missing]
    extra = [p for p in extra if (html / p).is_file() and p not in pages]
    if not pages:
        raise ValueError(f"no pages to check in {html}")
    own = drv is None
    if own:
        drv = start_browser(widths[0])
    stats = []
    try:
        with _Server(html) as srv:
            for w in widths:
                set_width(drv, w)
                at_w = []
                for page in pages + extra:
                    probs, st = check_page(drv, srv.base, page, w)
                    problems += probs
                    at_w.append(st)
                if navigate:
                    with_toc = [st["page"] for st in at_w[1:len(pages)]
                                if st and st["toc_links"]]
                    for page in [pages[0]] + with_toc[:1]:
                        toc = any(st and st["page"] == page and st["toc_links"]
                                  for st in at_w)
                        problems += check_navigation(drv, srv.base, page, w, toc)
                stats += at_w
            # navigation: the sidebar of the first page reaches every page
            if stats and stats[0]:
                linked = {unquote(urlsplit(u).path).lstrip("/")
                          for u in stats[0]["links"] if u.startswith(srv.base)}
                first = pages[0]
                for page in pages[1:]:
                    if page not in linked:
                        problems.append(Problem(first, "navigation",
                                                f"the sidebar has no link to {page}"))
    finally:
        if own:
            drv.quit()
    for st in stats:
        st.pop("links", None)
    return problems, stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", type=Path, help="a built html dir, e.g. _build/html")
    p.add_argument("--toc", type=Path, default=ROOT / "_toc.yml",
                   help="the _toc.yml whose pages to check (default: the repo's)")
    p.add_argument("--all", action="store_true",
                   help="check every page under the dir instead of the toc's")
    p.add_argument("--width", type=int, action="append",
                   help="viewport width in px, repeatable (default: "
                   + " and ".join(map(str, WIDTHS)) + ")")
    p.add_argument("--no-navigation", action="store_true",
                   help="do not press the sidebar, contents and search controls")
    p.add_argument("--json", type=Path, help="write problems and counts here")
    args = p.parse_args(argv)
    widths = tuple(args.width or WIDTHS)
    if min(widths) < 320:
        p.error(f"--width must be at least 320 px, got {min(widths)}")
    if not args.html.is_dir():
        p.error(f"{args.html} is not a directory")
    if not args.all and not args.toc.is_file():
        p.error(f"--toc {args.toc} does not exist (or pass --all)")
    pages = None if args.all else toc_pages(args.toc)
    start = time.perf_counter()
    try:
        problems, stats = check_site(args.html, pages, widths=widths,
                                     extra=[] if args.all else SPECIAL_PAGES,
                                     navigate=not args.no_navigation)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        print(f"check_pages: {err}", file=sys.stderr)
        return 2
    for st in stats:
        if st:
            print(f"{st['page']} at {st['width']}px: {st['math_typeset']}/"
                  f"{st['math_total']} math typeset, {st['images']} images, "
                  f"{st['scrolls']} boxes scroll sideways, {st['seconds']} s")
    for prob in problems:
        print(prob)
    print(f"{len(stats)} pages checked at {' and '.join(map(str, widths))}px, "
          f"{len(problems)} problems, "
          f"{time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"problems": [asdict(x) for x in problems],
                                         "pages": stats}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
