"""The likelihood study (pipelines.likelihood_study) and its runner (tools/run_likelihood.py)."""
import math
import sys
from pathlib import Path

import pytest
import torch

from flowjac.pipelines import likelihood_study as ls

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import run_likelihood  # noqa: E402

f64 = torch.float64
DESIGN = ls.LIKELIHOOD_STUDY


def sequence(limit, c, p, steps, c2=0.0):
    """b_s = limit - c s^-p (- c2 s^-(p+1)): a grid sequence of known order and limit."""
    s = torch.tensor(steps, dtype=f64)
    return limit[:, None] - c[:, None] * s ** -p - c2 * s ** -(p + 1)


def test_richardson_recovers_order_and_limit():
    limit = torch.tensor([2.5, 1.3, 0.7], dtype=f64)
    c = torch.tensor([3.0, 1.0, 0.2], dtype=f64)
    for p in (1.0, 2.5, 4.0):
        b = sequence(limit, c, p, (2, 4, 8))
        order = ls.observed_order(b[:, 0], b[:, 1], b[:, 2])
        assert torch.allclose(order, torch.full((3,), p, dtype=f64), atol=1e-10)
        assert torch.allclose(ls.richardson(b[:, 1], b[:, 2], p), limit, atol=1e-12)
        study = ls.grid_study(b, (2, 4, 8))
        assert study["p"] == pytest.approx(p, abs=1e-10) and study["finite_share"] == 1.0
        assert torch.allclose(study["err"], limit[:, None] - b, atol=1e-12)


def test_richardson_with_a_higher_order_term_converges_to_the_order():
    """With a second term the observed order tends to p as the grids shrink."""
    limit, c = torch.tensor([1.0], dtype=f64), torch.tensor([1.0], dtype=f64)
    steps = (2, 4, 8, 16, 32, 64)
    b = sequence(limit, c, 2.0, steps, c2=5.0)
    coarse = ls.grid_study(b, steps, triple=(2, 4, 8))
    fine = ls.grid_study(b, steps, triple=(16, 32, 64))
    assert abs(fine["p"] - 2.0) < abs(coarse["p"] - 2.0) < 1.0
    assert abs(float(fine["limit"][0]) - 1.0) < abs(float(coarse["limit"][0]) - 1.0)


def test_observed_order_is_nan_where_the_sequence_turns():
    order = ls.observed_order([1.0, 1.0, 1.0], [1.5, 1.5, 1.0], [1.4, 1.5, 1.0])
    assert torch.isnan(order).all()
    with pytest.raises(ValueError, match="triple"):
        ls.grid_study(torch.zeros(2, 3), (2, 4, 6))
    with pytest.raises(ValueError, match="bpd_table"):
        ls.grid_study(torch.zeros(2, 2), (2, 4, 8))


def verdict_for(c_full, c_ref, p=2.5, p_ref=None, n=40):
    """grid_verdict on a synthetic study: every image b_s = L - c s^-p."""
    gen = torch.Generator().manual_seed(0)
    limit = 2 + torch.rand(n, generator=gen, dtype=f64)
    c = c_full * (0.5 + torch.rand(n, generator=gen, dtype=f64))
    full_b = sequence(limit, c, p, (2, 4, 8))
    full = ls.grid_study(full_b, (2, 4, 8))
    ref_idx = torch.arange(10)
    ref_b = sequence(limit[ref_idx], c_ref * c[ref_idx], p if p_ref is None else p_ref,
                     (8, 16, 32))
    ref = ls.grid_study(ref_b, (8, 16, 32))
    return ls.grid_verdict(full, full["limit"][ref_idx], ref, ref_b[:, 2], (2, 4, 8), DESIGN)


def test_grid_verdict_both_outcomes():
    good = verdict_for(c_full=0.5, c_ref=1.0)          # err at 8: < 0.5 * 1.5 / 181 < 0.01
    assert good["trusted"] and good["status"] == "converged"
    assert good["converged"][8] and not good["converged"][2]
    assert good["finest_converged"] == 8 and good["q_ref"] < 1e-10
    coarse = verdict_for(c_full=20.0, c_ref=1.0)         # err at 8 ~ 0.1: only the limit
    assert coarse["trusted"] and coarse["status"] == "extrapolated only"
    assert not any(coarse["converged"].values()) and coarse["finest_converged"] is None
    # the fine grids follow another law: the (2, 4, 8) extrapolation is not trusted
    off = verdict_for(c_full=0.5, c_ref=40.0, p_ref=1.2)
    assert not off["trusted"] and off["status"] == "not shown convergent"
    assert not any(off["converged"].values())


def test_auroc_counts_ties_half_and_reads_lower_as_positive():
    assert ls.auroc([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert ls.auroc([3.0, 4.0], [1.0, 2.0]) == 0.0
    assert ls.auroc([1.0, 3.0], [2.0, 3.0]) == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    with pytest.raises(ValueError, match="at least one"):
        ls.auroc([], [1.0])


def two_groups(ll_shift, ink_shift, n=(60, 300), seed=1):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.zeros(sum(n), dtype=torch.bool)
    pos[:n[0]] = True
    score = torch.randn(sum(n), generator=gen, dtype=f64) - ll_shift * pos
    ink = (100 + 10 * torch.randn(sum(n), generator=gen, dtype=f64)
           - 10 * ink_shift * pos).round()
    return score, ink, pos


def test_separation_verdict_both_outcomes():
    better = ls.auroc_study(*two_groups(ll_shift=3.0, ink_shift=0.0), n_boot=300)
    v = ls.separation_verdict(better, DESIGN)
    assert better["ll"][1] > 0.9 and v == {"separation": "well", "versus_ink": "better than ink"}
    assert better["ink_mirror"][0] == pytest.approx(1 - better["ink"][0])
    worse = ls.auroc_study(*two_groups(ll_shift=0.0, ink_shift=3.0), n_boot=300)
    v = ls.separation_verdict(worse, DESIGN)
    assert v["versus_ink"] == "worse than ink"
    assert v["separation"] == "no better than chance"
    # ink on its mirror side: the likelihood must beat both sides
    mirror = ls.auroc_study(*two_groups(ll_shift=1.0, ink_shift=-3.0), n_boot=300)
    assert ls.separation_verdict(mirror, DESIGN)["versus_ink"] == "worse than ink"
    assert mirror["ink"][0] < 0.2 < 0.8 < mirror["ink_mirror"][0]
    below = {"ll": (0.3, 0.2, 0.4), "diff_ink": (0, -0.1, 0.1), "diff_mirror": (0, -0.1, 0.1)}
    assert ls.separation_verdict(below, DESIGN) == {
        "separation": "worse than chance", "versus_ink": "not distinguished from ink"}


def test_study_images_round_robin_and_too_few():
    labels = torch.tensor([0, 1, 0, 1, 2, 0])
    images = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1)
    x, lab, idx = ls.study_images(images, labels, (0, 1), 2)
    assert lab.tolist() == [0, 1, 0, 1] and idx.tolist() == [0, 1, 2, 3]
    assert x.flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="digit 2 has 1"):
        ls.study_images(images, labels, (0, 2), 2)
    assert ls.ink_count(torch.tensor([[0.2, 0.6, 0.9]]), 0.5).tolist() == [2]


TINY = dict(DESIGN, digits=(0, 5), per_class=2, steps=(1, 2), ref_steps=(4,),
            ref_per_class=1, batch=2)


def test_runner_resumes_and_refuses_to_overwrite(tmp_path):
    quiet = lambda msg: None   # noqa: E731
    whole = run_likelihood.run(tmp_path / "whole.pt", TINY, log=quiet)
    out = tmp_path / "run.pt"
    assert run_likelihood.run(out, TINY, stop_after=1, log=quiet) is None
    partial = tmp_path / "run.pt.partial"
    assert partial.exists() and not out.exists()
    stored = torch.load(partial, weights_only=True)
    assert stored["done"].tolist() == [True, True, False, False]
    resumed = run_likelihood.run(out, TINY, log=quiet)
    assert out.exists() and not partial.exists() and resumed["meta"]["complete"]
    assert len(resumed["meta"]["batches"]) == 2
    # the first batch was not redone and the result is the uninterrupted run's
    assert torch.equal(resumed["bpd"].isnan(), whole["bpd"].isnan())
    assert torch.allclose(resumed["bpd"].nan_to_num(), whole["bpd"].nan_to_num(), atol=1e-6)
    # 4 steps only on the first image of each digit (the reference subset)
    assert resumed["bpd"][:, 2].isnan().tolist() == [False, False, True, True]
    assert resumed["label"].tolist() == [0, 5, 0, 5]
    back = torch.load(out, weights_only=True)
    assert run_likelihood._same_design(back["meta"]["design"], TINY)
    assert back["meta"]["weights_sha256"] and back["meta"]["hardware"]["cpu"]
    with pytest.raises(SystemExit, match="--force"):
        run_likelihood.run(out, TINY, log=quiet)
    # a partial file of another design is refused, not mixed in
    assert run_likelihood.run(tmp_path / "b.pt", TINY, stop_after=1, log=quiet) is None
    with pytest.raises(SystemExit, match="another design"):
        run_likelihood.run(tmp_path / "b.pt", dict(TINY, noise_seed=1), log=quiet)
    assert math.isfinite(float(back["bpd"][0, 0]))
