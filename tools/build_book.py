"""Execute the chapters with papermill and render the book with Jupyter Book 1.x.

Usage (the Makefile wraps these):

    python tools/build_book.py book   [--profile quick|full] [--only CH ...]
    python tools/build_book.py golden [--only CH ...]
    python tools/build_book.py render-golden [--out DIR]
    python tools/build_book.py check-sync
    python tools/build_book.py pair [--only CH ...]

``book`` converts each MyST chapter (the source of truth) to a notebook,
executes it with papermill into ``_build/executed/``, and renders
``_build/html`` from the executed notebooks with warnings as errors.
``golden`` executes the quick profile and stores the results as the golden
notebooks in ``notebooks/`` (used by nbval). ``render-golden`` renders the
golden notebooks without executing anything. ``check-sync`` fails when a
chapter and its golden notebook differ in their cells. ``pair`` carries a
prose-only edit of a chapter (markdown cells, cell metadata such as tags,
captions and alt text) into its golden notebook, keeping every output: no
re-execution; it refuses when a code cell's source changed (``golden``).
``jupytext.toml`` pairs ``book/X.md`` with ``notebooks/X.ipynb`` for
Jupyter and ``jupytext --sync`` as well.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
GOLDEN = ROOT / "notebooks"
BUILD = ROOT / "_build"


def toc_files(path: Path | None = None) -> list[str]:
    """Every page of a jb-book ``_toc.yml`` (this book's by default) as a path relative to the root, no suffix."""
    path = Path(path) if path is not None else ROOT / "_toc.yml"
    toc = yaml.safe_load(path.read_text())
    if not isinstance(toc, dict) or "root" not in toc:
        raise ValueError(f"{path} is not a jb-book _toc.yml (no root)")
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []):
                    walk(child)

    walk(toc)
    return files


def read_md(md: Path):
    """Read a chapter as MyST markdown (only ``{code-cell}`` blocks are code)."""
    return jupytext.read(md, fmt="md:myst")


def has_code(md: Path) -> bool:
    nb = read_md(md)
    return any(c.cell_type == "code" for c in nb.cells)


def chapters(only=None) -> list[Path]:
    """The MyST chapters with code cells: ``only`` by stem, else the toc's."""
    if only:
        mds = [BOOK / f"{stem}.md" for stem in only]
        missing = [str(m) for m in mds if not m.exists()]
        if missing:
            raise SystemExit(f"--only names missing chapters: {missing}")
        return [m for m in mds if has_code(m)]
    out = []
    for f in toc_files():
        md = ROOT / f"{f}.md"
        if not md.exists():
            raise SystemExit(f"_toc.yml names {f}, but {md} does not exist")
        if has_code(md):
            out.append(md)
    return out


def _clean(nb):
    """Drop run-specific metadata so that golden notebooks diff cleanly."""
    nb.metadata.pop("papermill", None)
    # the pairing lives in jupytext.toml; jupytext's save drops these too
    jt = nb.metadata.get("jupytext", {})
    for key in ("text_representation", "formats"):
        jt.pop(key, None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    return nb


class _PeakMemory:
    """What the chapter's kernel (this process's children) used while it ran,
    sampled every half second: the largest resident memory (VmHWM), the CPU
    seconds (user + system, the last reading of each child) and the machine's
    mean one-minute load average. On a shared machine the wall time grows
    with the load; the CPU seconds of a one-thread kernel do not, and are
    close to the wall time the chapter takes on an idle machine."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._cpu, self._loads = {}, []
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @property
    def cpu(self) -> float:
        return sum(self._cpu.values())

    @property
    def load(self) -> float:
        return sum(self._loads) / len(self._loads) if self._loads else float("nan")

    def _watch(self):
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            self._loads.append(os.getloadavg()[0])
            for child in me.children(recursive=True):
                try:
                    with open(f"/proc/{child.pid}/status") as fh:
                        for line in fh:
                            if line.startswith("VmHWM:"):
                                self.peak = max(self.peak, int(line.split()[1]) * 1024)
                    t = child.cpu_times()
                    self._cpu[child.pid] = max(self._cpu.get(child.pid, 0.0),
                                               t.user + t.system)
                except (OSError, psutil.Error):
                    pass
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def execute(md: Path, dest: Path, parameters: dict, times: Path | None = None) -> float:
    """Convert a chapter to a notebook and execute it with papermill.

    Its wall time and its kernel's peak resident memory are merged into
    ``times`` (JSON; default ``_build/chapter_times.json``): the golden
    runs keep theirs in ``results/chapter_times.json``, from which the
    README's table of chapter times is generated (tools/readme_times.py).
    """
    import papermill as pm

    dest.parent.mkdir(parents=True, exist_ok=True)
    nb = read_md(md)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, _PeakMemory() as mem:
        src = Path(tmp) / f"{md.stem}.ipynb"
        nbformat.write(nb, src)
        pm.execute_notebook(str(src), str(dest), parameters=parameters or None,
                            cwd=str(GOLDEN), kernel_name="python3",
                            progress_bar=False, log_output=False)
    secs = time.perf_counter() - start
    out = nbformat.read(dest, as_version=4)
    nbformat.write(_hide_tooling(_clean(out)), dest)
    _record_time(times or BUILD / "chapter_times.json", md.stem, secs, mem.peak,
                 (parameters or {}).get("profile", "quick"), cpu=mem.cpu, load=mem.load)
    return secs


TIMES = ROOT / "results" / "chapter_times.json"


def _record_time(path: Path, chapter: str, secs: float, peak: int, profile: str,
                 cpu: float | None = None, load: float | None = None) -> None:
    """Merge one chapter's wall time, kernel CPU time, load and peak memory into the JSON file ``path``."""
    import json

    sys.path.insert(0, str(ROOT))
    from flowjac.utils import hardware, save_json

    data = json.loads(path.read_text()) if path.exists() else {"chapters": {}}
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
    data["chapters"][chapter] = dict(
        seconds=round(secs, 1), peak_bytes=int(peak), profile=profile,
        cpu_seconds=None if cpu is None else round(cpu, 1),
        load=None if load is None or load != load else round(load, 2),
        threads=int(threads) if threads.isdigit() else threads,
        cpu=hardware().get("cpu"), cpu_count=os.cpu_count(),
        date=time.strftime("%Y-%m-%d"))
    save_json(path, data)


def _hide_tooling(nb):
    """Keep papermill's injected ``# Parameters`` cell out of the page."""
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
    return nb


def stage(notebook_dir: Path, stage_dir: Path) -> Path:
    """Lay out a book tree whose chapters are already-executed notebooks."""
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    (stage_dir / "book").mkdir(parents=True)
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    cfg.setdefault("execute", {})["execute_notebooks"] = "off"
    (stage_dir / "_config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    shutil.copy(ROOT / "_toc.yml", stage_dir / "_toc.yml")
    for f in toc_files():
        md = ROOT / f"{f}.md"
        if has_code(md):
            nb = notebook_dir / f"{md.stem}.ipynb"
            if not nb.exists():
                raise SystemExit(f"no executed notebook {nb} for {md}")
            shutil.copy(nb, stage_dir / f"{f}.ipynb")
        else:
            shutil.copy(md, stage_dir / f"{f}.md")
    for extra in ("book/figures", "book/references.bib", "_static"):
        if (ROOT / extra).exists():
            dst = stage_dir / extra
            if (ROOT / extra).is_dir():
                shutil.copytree(ROOT / extra, dst)
            else:
                shutil.copy(ROOT / extra, dst)
    return stage_dir


def render(stage_dir: Path, out_dir: Path) -> None:
    """Run ``jb build`` on a staged tree, Sphinx warnings as errors."""
    jb = Path(sys.executable).parent / "jb"
    cmd = [str(jb), "build", str(stage_dir), "--path-output", str(out_dir),
           "-W", "-n", "--keep-going"]
    print("$", " ".join(cmd), flush=True)
    # autodoc (book/api.md) imports this checkout's flowjac, installed or not
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    subprocess.run(cmd, check=True, env=env)
    index = out_dir / "_build" / "html" / "index.html"
    if not index.exists():
        raise SystemExit(f"the build did not produce {index}")
    print(f"book written to {index}")


def cmd_book(args) -> None:
    params = {"profile": args.profile}
    if args.device:
        params["device"] = args.device
    for item in args.param or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--param takes KEY=VALUE, got {item!r}")
        params[key] = yaml.safe_load(value)
    executed = BUILD / "executed" / args.profile
    for md in chapters(args.only):
        print(f"executing {md.name} (profile={args.profile}) ...", flush=True)
        chapter_params = dict(params)
        if md.stem == "scorecard":      # reads the chapters executed above
            chapter_params["notebook_dir"] = str(executed)
        secs = execute(md, executed / f"{md.stem}.ipynb", chapter_params)
        print(f"  done in {secs:.0f} s", flush=True)
    if args.only:
        print("--only given: not rendering the book")
        return
    if BUILD.joinpath("html").exists():
        shutil.rmtree(BUILD / "html")
    render(stage(executed, BUILD / "stage"), ROOT)


def cmd_golden(args) -> None:
    GOLDEN.mkdir(exist_ok=True)
    for md in chapters(args.only):
        print(f"executing {md.name} into notebooks/ ...", flush=True)
        secs = execute(md, GOLDEN / f"{md.stem}.ipynb", {}, times=TIMES)
        print(f"  done in {secs:.0f} s", flush=True)


def cmd_render_golden(args) -> None:
    out = Path(args.out).resolve()
    render(stage(GOLDEN, out / "stage"), out)


def sync_problems() -> list[str]:
    """Where chapters and golden notebooks differ in their cells."""
    problems = []
    for md in chapters():
        gold = GOLDEN / f"{md.stem}.ipynb"
        if not gold.exists():
            problems.append(f"{md.name}: no golden notebook {gold.name}")
            continue
        a = read_md(md).cells
        b = nbformat.read(gold, as_version=4).cells
        key = lambda c: (c.cell_type, c.source.strip(),
                         sorted(c.metadata.get("tags", [])))
        if [key(c) for c in a] != [key(c) for c in b]:
            problems.append(f"{md.name} and notebooks/{gold.name} differ in "
                            "their cells: run `make golden`")
        elif not all(c.get("execution_count") for c in b
                     if c.cell_type == "code"):
            problems.append(f"notebooks/{gold.name} was not fully executed: "
                            "run `make golden`")
    return problems


def _code_sources(nb) -> list[str]:
    return [c.source.strip() for c in nb.cells if c.cell_type == "code"]


def pair(md: Path, gold: Path) -> bool:
    """Carry ``md``'s markdown cells and cell metadata into ``gold``, outputs kept.

    jupytext's ``--update`` semantics (``combine_inputs_with_outputs``):
    the inputs come from the chapter, the outputs and execution counts from
    the golden notebook, whose metadata is then cleaned as ``golden``
    leaves it. Returns whether ``gold`` changed. Refuses (SystemExit) when
    the code cells differ, since their outputs would no longer be theirs.
    """
    from jupytext.combine import combine_inputs_with_outputs

    if not md.is_file():
        raise SystemExit(f"no chapter {md}")
    if not gold.is_file():
        raise SystemExit(f"no golden notebook {gold}: run `make golden CH={md.stem}`")
    src = read_md(md)
    old = nbformat.read(gold, as_version=4)
    a, b = _code_sources(src), _code_sources(old)
    if a != b:
        n = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
        raise SystemExit(
            f"{md.name}: {n} code cell(s) differ from {gold.name} ({len(a)} in the "
            f"chapter, {len(b)} in the notebook); pairing carries prose only, so "
            f"re-execute: `make golden CH={md.stem}`")
    new = _clean(combine_inputs_with_outputs(src, old, fmt="md:myst"))
    if nbformat.writes(new) == nbformat.writes(old):
        return False
    nbformat.write(new, gold)
    return True


def cmd_pair(args) -> None:
    refused = []
    for md in chapters(args.only):
        gold = GOLDEN / f"{md.stem}.ipynb"
        try:
            changed = pair(md, gold)
        except SystemExit as err:          # code changed: tell, go on
            refused.append(str(err))
            continue
        print(f"{md.name} -> notebooks/{gold.name}: "
              f"{'markdown updated, outputs kept' if changed else 'already in sync'}")
    if refused:
        raise SystemExit("\n".join(refused))


def cmd_check_sync(args) -> None:
    problems = sync_problems()
    for p in problems:
        print(p)
    if problems:
        raise SystemExit(1)
    print("chapters and golden notebooks are in sync")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("book", help="execute all chapters, render _build/html")
    b.add_argument("--profile", default="quick", choices=["quick", "full"])
    b.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    b.add_argument("--only", nargs="*", help="chapter stems to execute")
    b.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a chapter parameter (YAML value), e.g. arch=unet")
    b.set_defaults(func=cmd_book)
    g = sub.add_parser("golden", help="refresh the golden notebooks")
    g.add_argument("--only", nargs="*")
    g.set_defaults(func=cmd_golden)
    r = sub.add_parser("render-golden", help="render the golden notebooks")
    r.add_argument("--out", default=str(BUILD / "golden"))
    r.set_defaults(func=cmd_render_golden)
    s = sub.add_parser("check-sync", help="chapters vs golden notebooks")
    s.set_defaults(func=cmd_check_sync)
    pp = sub.add_parser("pair", help="carry prose edits into the golden notebooks")
    pp.add_argument("--only", nargs="*", help="chapter stems")
    pp.set_defaults(func=cmd_pair)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
