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


def test_public_docstrings_name_a_chapter():
    titles = [t.lower() for t in chapter_titles()]
    missing = []
    for qual, obj in public_objects():
        doc = inspect.getdoc(obj) or ""
        if not doc or not any(t in doc.lower() for t in titles):
            missing.append(qual)
    assert not missing, ("these public objects lack a docstring naming a "
                         f"chapter ({titles}): {missing}")
