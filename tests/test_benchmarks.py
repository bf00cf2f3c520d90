"""The benchmark scripts run and print ratios (a smoke test at toy sizes;
no timing is asserted)."""
import json
import subprocess
import sys

import pytest

from flowjac.utils import repo_root


@pytest.mark.parametrize("script, args, key", [
    ("jvp.py", ["--steps", "1", "--repeats", "1", "--threads", "1"], None),
    ("spectra.py", ["--steps", "1", "--repeats", "1", "--threads", "1", "--unet", "small",
                    "--mlp-batch", "16"], None),
    ("interop.py", ["--steps", "1", "--repeats", "1", "--threads", "1", "--batch", "1",
                    "--mlp-batch", "16", "--mlp-hidden", "16"], None),
    ("cpu_speed.py", ["--part", "mnist-fives", "--batch", "2", "--sample-batch", "2",
                      "--steps", "1", "--repeats", "1", "--threads", "1", "--no-compile"], None),
    ("jvp_cost.py", ["--batch", "1", "--k", "1", "--steps", "1", "--repeats", "1"], None),
    ("scaling.py", ["--n", "8", "--batch-size", "4", "--repeats", "1", "--size", "8",
                    "--base-channels", "8", "--steps", "1"], None),
])
def test_benchmark_runs_and_prints_json(script, args, key, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(repo_root() / "benchmarks" / script), *args,
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert "hardware" in json.dumps(result)
    if key:
        assert set(result[key]) == {"train_step", "attribute_jvp", "grad_norm"}
        assert all(r > 0 for r in result[key].values())
