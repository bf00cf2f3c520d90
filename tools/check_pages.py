"""Check a built HTML book in headless Chromium, the way a reader sees it.

Usage:

    python tools/check_pages.py _build/html            # the pages of _toc.yml
    python tools/check_pages.py DIR --all              # every page under DIR
    python tools/check_pages.py DIR --width 1400 --json report.json

The book is served from 127.0.0.1 and the browser can resolve no other host
(the reader is offline), and every page is checked for:

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
* no horizontal overflow at the given width (``scrollWidth > clientWidth +
  1``) of display math, cell outputs' ``<pre>`` and tables;
* no papermill ``injected-parameters`` cell on the page;
* navigation: every page is linked from the sidebar of the first page.

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


@dataclass(frozen=True)
class Problem:
    page: str       # path of the page relative to the html dir
    kind: str       # what is wrong: "raw-tex", "image", "overflow", ...
    detail: str     # the element and a snippet of its text

    def __str__(self):
        return f"{self.page}: {self.kind}: {self.detail}"


# Runs in the page once it has loaded, MathJax has typeset and fonts are in.
# Returns plain data; the Python side turns it into Problems.
_PAGE_JS = r"""
const done = arguments[arguments.length - 1];
const BUILD_PATHS = arguments[0], TRACEBACK = arguments[1];
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
               paths: [], overflow: [], injected: [], links: [],
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

  // horizontal overflow
  const sel = ["div.math", "mjx-container[display]", ".cell_output pre",
               ".output pre", "table", ".pst-scrollable-table-container"];
  const seen = new Set();
  for (const el of document.querySelectorAll(sel.join(", "))) {
    if (seen.has(el)) continue;
    seen.add(el);
    const cs = getComputedStyle(el);
    if (cs.display === "inline" || cs.display === "none") continue;
    if (el.scrollWidth > el.clientWidth + 1) {
      // name the widest line of a <pre>, where the fix is
      const text = el.tagName === "PRE" ? el.textContent.split("\n")
        .reduce((a, b) => (b.length > a.length ? b : a), "") : el.textContent;
      out.overflow.push(describe(el) + " " + el.scrollWidth + "px in " +
                        el.clientWidth + "px: " + snip(text, 90));
    }
  }

  for (const el of document.querySelectorAll(".tag_injected-parameters")) {
    out.injected.push(describe(el) + ": " + snip(el.textContent));
  }

  for (const a of document.querySelectorAll(".bd-docs-nav a[href], .bd-sidebar-primary a[href], nav.bd-links a[href]")) {
    out.links.push(a.href);
  }
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


def start_browser(width: int = 1400, height: int = 1000):
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
                f"--window-size={width},{height}",
                # offline: no host but the book's server resolves
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    drv.set_page_load_timeout(60)
    drv.set_script_timeout(60)
    # the layout viewport must be `width` wide, whatever the window chrome
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1,
                         "mobile": False})
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


def check_page(drv, base: str, page: str) -> tuple[list[Problem], dict]:
    """Load one page and return its problems and its counts."""
    drv.get_log("performance")          # drop what earlier pages logged
    start = time.perf_counter()
    drv.get(urljoin(base, page))
    res = drv.execute_async_script(_PAGE_JS, list(BUILD_PATHS), TRACEBACK)
    secs = time.perf_counter() - start
    probs: list[Problem] = []
    if not isinstance(res, dict) or "error" in res:
        return [Problem(page, "script", f"the checks did not run: {res}")], {}
    add = lambda kind, detail: probs.append(Problem(page, kind, detail))  # noqa: E731
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
    for s in res["overflow"]:
        add("overflow", s)
    for s in res["injected"]:
        add("injected-parameters", s)
    stats = {"page": page, "math_total": res["math_total"],
             "math_typeset": res["math_typeset"], "images": len(res["images"]),
             "seconds": round(secs, 2), "links": res["links"]}
    return probs, stats


def check_site(html: Path, pages: list[str] | None = None, width: int = 1400,
               drv=None, extra: list[str] = ()) -> tuple[list[Problem], list[dict]]:
    """Check ``pages`` (default: every page) of the built book in ``html``.

    The first page is the index whose sidebar must link to every other
    page; ``extra`` pages (e.g. ``search.html``) are checked too but need
    no sidebar link. Returns the problems and per-page counts (math items,
    typeset math items, images, seconds).
    """
    html = Path(html).resolve()
    if not html.is_dir():
        raise FileNotFoundError(f"no html directory {html}")
    pages = list(pages) if pages is not None else all_pages(html)
    missing = [p for p in pages if not (html / p).is_file()]
    problems = [Problem(p, "missing-page", f"{html / p} does not exist") for p in missing]
    pages = [p for p in pages if p not in missing]
    extra = [p for p in extra if (html / p).is_file() and p not in pages]
    if not pages:
        raise ValueError(f"no pages to check in {html}")
    own = drv is None
    if own:
        drv = start_browser(width)
    stats = []
    try:
        with _Server(html) as srv:
            for page in pages + extra:
                probs, st = check_page(drv, srv.base, page)
                problems += probs
                stats.append(st)
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
    p.add_argument("--width", type=int, default=1400, help="viewport width in px")
    p.add_argument("--json", type=Path, help="write problems and counts here")
    args = p.parse_args(argv)
    if args.width < 320:
        p.error(f"--width must be at least 320 px, got {args.width}")
    if not args.html.is_dir():
        p.error(f"{args.html} is not a directory")
    if not args.all and not args.toc.is_file():
        p.error(f"--toc {args.toc} does not exist (or pass --all)")
    pages = None if args.all else toc_pages(args.toc)
    start = time.perf_counter()
    try:
        problems, stats = check_site(args.html, pages, args.width,
                                     extra=[] if args.all else SPECIAL_PAGES)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        print(f"check_pages: {err}", file=sys.stderr)
        return 2
    for st in stats:
        print(f"{st['page']}: {st['math_typeset']}/{st['math_total']} math typeset, "
              f"{st['images']} images, {st['seconds']} s")
    for prob in problems:
        print(prob)
    print(f"{len(stats)} pages, {len(problems)} problems, "
          f"{time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"problems": [asdict(x) for x in problems],
                                         "pages": stats}, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
