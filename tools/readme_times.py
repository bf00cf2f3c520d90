"""Write the README's table of chapter times from results/chapter_times.json.

    python tools/readme_times.py          # rewrite the table in README.md
    python tools/readme_times.py --check  # exit 1 if README.md's table is stale

The table sits between the lines ``<!-- chapter-times: start -->`` and
``<!-- chapter-times: end -->``. Each row is a chapter of ``_toc.yml`` with
the wall time, the kernel's CPU seconds, the machine's mean load average
and the kernel's peak resident memory of its last golden run (``make
golden``, recorded by tools/build_book.py), the torch threads it ran with,
the machine and the date: measured, never typed. On a shared machine the
wall time grows with the load; a one-thread kernel's CPU seconds are about
what the chapter takes on an idle one ("–": recorded before they were).
The Morpho-MNIST section's build time comes the same way from
``results/morpho_dataset.json`` (between ``<!-- morpho-build: start -->``
and ``<!-- morpho-build: end -->``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMES = ROOT / "results" / "chapter_times.json"
START, END = "<!-- chapter-times: start -->", "<!-- chapter-times: end -->"
MORPHO = ROOT / "results" / "morpho_dataset.json"
MORPHO_START, MORPHO_END = "<!-- morpho-build: start -->", "<!-- morpho-build: end -->"


def _titles() -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from build_book import has_code, toc_files
    finally:
        sys.path.pop(0)
    out = {}
    for f in toc_files():
        md = ROOT / f"{f}.md"
        if not has_code(md):        # prose-only pages are not executed
            continue
        title = next((ln[2:].strip() for ln in md.read_text().splitlines()
                      if ln.startswith("# ")), md.stem)
        out[md.stem] = title
    return out


def table() -> str:
    """The markdown table of the recorded chapter times."""
    data = json.loads(TIMES.read_text())["chapters"] if TIMES.exists() else {}
    rows = ["| chapter | wall | kernel CPU | load | peak memory | threads | machine, date |",
            "|---|---|---|---|---|---|---|"]
    for stem, title in _titles().items():
        r = data.get(stem)
        if r is None:
            continue
        cpu = "–" if r.get("cpu_seconds") is None else f"{r['cpu_seconds']:.0f} s"
        load = "–" if r.get("load") is None else f"{r['load']:.1f}"
        rows.append(f"| {title} | {r['seconds']:.0f} s | {cpu} | {load} | "
                    f"{r['peak_bytes'] / 1e9:.2f} GB | "
                    f"{r['threads']} | {r['cpu']} ({r['cpu_count']} cores), {r['date']} |")
    missing = [t for s, t in _titles().items() if s not in data]
    note = ("" if not missing else "\nNot yet recorded (no golden run since timing began): "
            + ", ".join(missing) + ".\n")
    return "\n".join(rows) + "\n" + note


def morpho_build() -> str:
    """The sentence of the Morpho-MNIST renders' build time, from results/morpho_dataset.json."""
    if not MORPHO.exists():
        return "The Morpho-MNIST renders' build time is not yet recorded.\n"
    r = json.loads(MORPHO.read_text())
    hw = r["hardware"]
    return (f"Building the renders took {r['data']['seconds'] / 60:.0f} min for the "
            f"{r['data']['renders']:,} training images and {r['heldout']['seconds']:.0f} s for "
            f"the {r['heldout']['renders']:,} held-out ones ({hw['cpu']}, {hw['cpu_count']} "
            f"cores, {r['date']}; `results/morpho_dataset.json`).\n")


def _block(text: str, start: str, end: str, body: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


def rewrite(text: str) -> str:
    """``text`` with the generated blocks (chapter times, the Morpho build time) replaced."""
    text = _block(text, START, END, table())
    return _block(text, MORPHO_START, MORPHO_END, morpho_build())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    text = README.read_text()
    new = rewrite(text)
    if args.check:
        if new != text:
            print("README.md's chapter times or Morpho build time are stale: run python tools/readme_times.py")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
