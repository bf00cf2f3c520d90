"""Turn chapter titles quoted in docstrings into ``:ref:`` links to labels.

Docstrings of flowjac name the section that explains them. The convention
is a reST reference to the section's label, e.g. ``:ref:`sec_gaussian```;
the API reference page (``book/api.md``) renders it as a link, and the
label survives a change of the section's title. This script rewrites the
older convention, a quoted title (``; "Gaussian targets".``), in place:

    python tools/docstring_refs.py            # rewrite flowjac/**/*.py
    python tools/docstring_refs.py --check    # list what it would rewrite

Only docstrings (of modules, classes and functions) are touched, and in
them only a quoted title of a section that carries a label, ``(sec_x)=``
on the line above its heading in ``book/*.md``. Each file is read and
written in one go, so concurrent edits of other files are not disturbed.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
PACKAGE = ROOT / "flowjac"

LABEL_RE = re.compile(r"^\((?P<label>[A-Za-z0-9_\-]+)\)=\s*$")
HEADING_RE = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*$")


def book_labels(book: Path = BOOK) -> dict[str, str]:
    """Every ``(label)=`` target in ``book/*.md``, mapped to its heading."""
    labels = {}
    for md in sorted(book.glob("*.md")):
        lines = md.read_text().splitlines()
        for i, line in enumerate(lines):
            m = LABEL_RE.match(line)
            if not m:
                continue
            title = ""
            for nxt in lines[i + 1:]:
                if nxt.strip():
                    h = HEADING_RE.match(nxt)
                    title = h.group("title") if h else ""
                    break
            labels[m.group("label")] = title
    return labels


def _title_pattern(title: str) -> re.Pattern:
    # a quoted title, possibly wrapped over lines of the docstring
    words = [re.escape(w) for w in title.split()]
    return re.compile(r'"' + r"\s+".join(words) + r'"')


def docstring_spans(source: str) -> list[tuple[int, int]]:
    """Character spans of the docstrings of a module's source."""
    tree = ast.parse(source)
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    spans = []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
        n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in nodes:
        body = getattr(node, "body", [])
        if body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            c = body[0].value
            # col offsets are in UTF-8 bytes; convert through the line
            lines = source.splitlines(keepends=True)
            a_line = lines[c.lineno - 1].encode()
            b_line = lines[c.end_lineno - 1].encode()
            a = starts[c.lineno - 1] + len(a_line[:c.col_offset].decode())
            b = starts[c.end_lineno - 1] + len(b_line[:c.end_col_offset].decode())
            spans.append((a, b))
    return sorted(spans)


def rewrite(source: str, labels: dict[str, str]) -> tuple[str, list[str]]:
    """``source`` with quoted titles in docstrings replaced; what changed."""
    patterns = [(_title_pattern(t), lab) for lab, t in labels.items() if t]
    # longest titles first, so that a title never eats part of a longer one
    patterns.sort(key=lambda p: -len(p[0].pattern))
    out, pos, changes = [], 0, []
    for a, b in docstring_spans(source):
        doc = source[a:b]
        for pat, lab in patterns:
            doc, n = pat.subn(f":ref:`{lab}`", doc)
            if n:
                changes.append(f"{n} x {pat.pattern!r} -> :ref:`{lab}`")
        out.append(source[pos:a])
        out.append(doc)
        pos = b
    out.append(source[pos:])
    return "".join(out), changes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="only list the rewrites; exit 1 if there are any")
    p.add_argument("paths", nargs="*", type=Path,
                   help="files to rewrite (default: every flowjac/**/*.py)")
    args = p.parse_args(argv)
    labels = book_labels()
    if not labels:
        print(f"no (label)= targets found in {BOOK}", file=sys.stderr)
        return 2
    paths = args.paths or sorted(p for p in PACKAGE.rglob("*.py")
                                 if "weights" not in p.parts)
    total = 0
    for path in paths:
        if not path.is_file():
            print(f"not a file: {path}", file=sys.stderr)
            return 2
        source = path.read_text()
        new, changes = rewrite(source, labels)
        if not changes:
            continue
        total += len(changes)
        print(f"{path.relative_to(ROOT) if path.is_absolute() else path}: "
              f"{len(changes)} rewrite(s)")
        if not args.check:
            ast.parse(new)          # never write a file that no longer parses
            path.write_text(new)
    print(f"{total} rewrite(s) {'needed' if args.check else 'done'}")
    return 1 if (args.check and total) else 0


if __name__ == "__main__":
    sys.exit(main())
