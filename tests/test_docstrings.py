"""Every public function and class of flowjac has a docstring naming the
chapter that explains it (d2l's "Defined in" habit)."""
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import flowjac

ROOT = Path(__file__).resolve().parent.parent


def chapter_titles():
    titles = []
    for md in (ROOT / "book").glob("*.md"):
        if md.stem == "index":
            continue
        m = re.search(r"^# (.+)$", md.read_text(), flags=re.M)
        if m:
            titles.append(m.group(1).strip())
    titles.append("How to run the book")
    return titles


def public_objects():
    for info in pkgutil.iter_modules(flowjac.__path__):
        mod = importlib.import_module(f"flowjac.{info.name}")
        names = getattr(mod, "__all__", None) or [
            n for n in vars(mod) if not n.startswith("_")]
        for name in names:
            obj = getattr(mod, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and \
                    obj.__module__ == mod.__name__:
                yield f"flowjac.{info.name}.{name}", obj


def test_public_docstrings_name_a_chapter():
    titles = [t.lower() for t in chapter_titles()]
    missing = []
    for qual, obj in public_objects():
        doc = inspect.getdoc(obj) or ""
        if not doc or not any(t in doc.lower() for t in titles):
            missing.append(qual)
    assert not missing, ("these public objects lack a docstring naming a "
                         f"chapter ({titles}): {missing}")
