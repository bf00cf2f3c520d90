"""Every public function and class of flowjac has a docstring linking to the
section that explains it (d2l's "Defined in" habit): a reST reference to a
section label of the book, e.g. :ref:`sec_gaussian`, which the API
reference page (book/api.md) renders as a link."""
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import flowjac

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import docstring_refs  # noqa: E402

REF_RE = re.compile(r":ref:`(?:[^`<]*<)?([A-Za-z0-9_\-]+)>?`")


def modules():
    """Every module of the package, subpackages included."""
    for info in pkgutil.walk_packages(flowjac.__path__, prefix="flowjac."):
        if info.name.endswith("__main__"):
            continue
        yield importlib.import_module(info.name)


def public_objects():
    for mod in modules():
        names = getattr(mod, "__all__", None) or [
            n for n in vars(mod) if not n.startswith("_")]
        for name in names:
            obj = getattr(mod, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and \
                    obj.__module__ == mod.__name__:
                yield f"{mod.__name__}.{name}", obj


def test_the_walk_sees_the_subpackages():
    names = {m.__name__ for m in modules()}
    assert {"flowjac.engine.jvp", "flowjac.closedform.gaussian",
            "flowjac.estimators.covariance", "flowjac.models.pretrained"} <= names
    assert sum(1 for _ in public_objects()) > 100


def test_modules_over_400_lines_say_why():
    long = []
    for mod in modules():
        path = Path(mod.__file__)
        if sum(1 for _ in path.open()) > 400 and "400 lines" not in (mod.__doc__ or ""):
            long.append(str(path.relative_to(ROOT)))
    assert not long, f"modules over 400 lines without a reason at the top: {long}"


def test_public_docstrings_link_to_a_section_label():
    labels = set(docstring_refs.book_labels())
    assert {"sec_gaussian", "sec_how_to_run"} <= labels
    missing, unknown = [], []
    for qual, obj in public_objects():
        refs = REF_RE.findall(inspect.getdoc(obj) or "")
        if not refs:
            missing.append(qual)
        unknown += [f"{qual}: {r}" for r in refs if r not in labels]
    assert not missing, ("these public objects lack a docstring with a "
                         ":ref:`<label>` to the section that explains them "
                         f"(labels: (sec_...)= lines in book/*.md): {missing}")
    assert not unknown, f"docstrings refer to labels not in book/*.md: {unknown}"


def test_no_quoted_titles_left_in_docstrings():
    """The old convention (a quoted title) is rewritten by the script."""
    leftovers = []
    labels = docstring_refs.book_labels()
    for path in sorted((ROOT / "flowjac").rglob("*.py")):
        _, changes = docstring_refs.rewrite(path.read_text(), labels)
        leftovers += [f"{path.relative_to(ROOT)}: {c}" for c in changes]
    assert not leftovers, ("quoted section titles in docstrings; run "
                           "`python tools/docstring_refs.py`: " + "; ".join(leftovers))


def test_the_rewrite_touches_docstrings_only():
    src = ('"""Module; see "Gaussian targets"."""\n'
           'TITLE = "Gaussian targets"\n'
           'def f():\n'
           '    """Closed form; "Gaussian\n    targets"."""\n'
           '    return "Gaussian targets"\n')
    new, changes = docstring_refs.rewrite(src, {"sec_gaussian": "Gaussian targets"})
    assert len(changes) == 2
    assert new.count(":ref:`sec_gaussian`") == 2
    assert 'TITLE = "Gaussian targets"' in new
    assert 'return "Gaussian targets"' in new


def test_the_api_page_documents_every_module():
    page = (ROOT / "book" / "api.md").read_text()
    documented = set(re.findall(r"^\.\. automodule:: (\S+)", page, flags=re.M))
    missing = sorted({m.__name__ for m in modules()} - documented)
    assert not missing, f"book/api.md has no automodule for {missing}"
    assert "file: book/api" in (ROOT / "_toc.yml").read_text()


def test_the_package_map_names_every_module():
    """flowjac/__init__.py's map and each subpackage's docstring name all their modules."""
    top = flowjac.__doc__
    missing = []
    for mod in modules():
        parts = mod.__name__.split(".")
        if len(parts) != 3 or parts[2].startswith("_"):
            continue
        sub = importlib.import_module(".".join(parts[:2]))
        for where, doc in (("flowjac/__init__.py", top), (f"{parts[1]}/__init__.py", sub.__doc__)):
            if f"``{parts[2]}``" not in (doc or ""):
                missing.append(f"{mod.__name__} (in {where})")
    assert not missing, f"modules the package maps do not name: {missing}"
