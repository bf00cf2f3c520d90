"""Soft attributes through the paper's lens: corr(t, i) of the unconditional Morpho-MNIST flow read by the (t, i) regressor, by the paper's normalised E[J J^T], the covariance identity and plain samples at equal compute.

The attributes chapter found the paper's estimator broken by a saturated
classifier: its logits' Jacobians vanish where the classifier is sure, so
the normalised second moment of the JVPs says little about the logits'
correlation. Issue 33 asks whether *soft* attributes rescue it: the
regressor's two outputs (standardised thickness and intensity, linear, so
nothing saturates) read through the unconditional flow, whose samples'
corr(t, i) the SCM fixes exactly (``morpho.scm_moments``).

**The estimates** (``soft_summary``), from one probe run
(``probing.probe`` with pairs: n latents, k probes, the pair JVPs at
z_rho) and plain samples of the same readout:

* *paper*: corr of E[J J^T] over the n latents' JVPs (the normalised
  second moment, ``moments.moment_to_corr``);
* *identity*: corr of the covariance identity's estimate
  (``covariance.covariance_from_pairs``);
* *plain*: the sample correlation of r(phi(z)) for fresh latents at equal
  compute: n (1 + k) samples for the paper's estimate (one JVP with k
  probes costs 1 + k evaluations of the flow), 2 n (1 + k) for the
  identity's (JVPs at z and at z_rho);
* *reference*: the flow's own correlation, from ``reference_n`` further
  plain samples (seed apart), the quantity all three estimate;
* *exact*: the SCM's corr(t, i) by quadrature, which a perfect flow read
  by a perfect regressor would give.

Each with a 95% interval: a percentile bootstrap over latents (samples for
plain), replaced by the range over ten disjoint groups
(``stored.group_spread``) when the per-latent terms' Hill index is below 2
(``intervals.hill_index``: no finite variance, a bootstrap understates);
the tail diagnostics (Hill index, the share of the top 1%) beside. The
verdict (``soft_verdict``) applies ``SOFT_STUDY["rule"]``, fixed before any
data. Explained in :ref:`sec_attributes`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from flowjac._checks import check_int
from flowjac.data import morpho
from flowjac.engine import probing
from flowjac.estimators import intervals
from flowjac.estimators.covariance import covariance_from_pairs
from flowjac.estimators.moments import moment_to_corr
from flowjac.pipelines.stored import group_spread

__all__ = ["SOFT_STUDY", "run_soft_study", "paper_terms", "identity_terms", "corr_of_mean",
           "soft_summary", "soft_verdict"]

SOFT_STUDY = {
    # the attributes chapter's stored probe design (results/attributes_probes.pt)
    "n": 10_000, "k": 2, "method": "midpoint", "steps": 10,
    "seed": 0, "plain_seed": 1, "reference_seed": 2,
    "reference_n": 100_000,      # the flow's own corr(t, i) to about 0.003
    "quick": dict(n=64, reference_n=2_000),
    "level": 0.95, "n_boot": 2000, "interval_seed": 0,
    "groups": 10,                # disjoint groups when the tails are heavy
    "hill_min": 2.0,             # below: no finite variance, group ranges replace the bootstrap
    "hill_frac": 0.05, "tail_frac": 0.01,
    "efficiency_factor": 2.0,
    "max_reference_halfwidth": 0.05,
    "rule": ("An estimator rescues the method when (1) its 95% interval meets the "
             "reference interval (the flow's own corr(t, i) from reference_n independent "
             "plain samples: the estimator is not biased beyond its noise) and (2) its "
             "distance from the reference is at most 2 standard errors of plain samples "
             "at its equal compute (the plain sample correlation's bootstrap interval "
             "half-width / 1.96): no worse than plain samples of the same cost are in 95% "
             "of runs. Judged against the flow's own correlation, not the SCM's: the "
             "flow's and the regressor's errors are no fault of the estimator (the "
             "errors against the SCM's exact value are printed beside). Inconclusive when "
             "the reference's half-width exceeds 0.05 or a number is undefined."),
}


# ------------------------------------------------------------------- runs
def run_soft_study(velocity, readout, latent_shape, *, n: int | None = None,
                   k: int | None = None, reference_n: int | None = None, device="cpu",
                   dtype=torch.float64, batch_size: int = 256, progress: bool = False,
                   partial_dir=None) -> dict:
    """The raw tensors of the study: ``probing.probe`` with pairs, plain samples at equal compute and the reference plain samples; :ref:`sec_attributes`.

    ``readout`` maps flow outputs (B, 1, 28, 28) to (B, 2): the
    ``MorphoReadout`` (the regressor's thickness, unclamped so that its JVPs
    exist everywhere, and the measured intensity, ``morpho.intensity_torch``,
    since the regressor's intensity failed its gate); ``velocity`` and ``readout`` on ``device`` in
    ``dtype``. Sizes and seeds default to ``SOFT_STUDY``. ``partial_dir``:
    a folder where each part writes its batches and resumes from them.
    """
    s = SOFT_STUDY
    n = s["n"] if n is None else check_int("n", n, minimum=2)
    k = s["k"] if k is None else check_int("k", k, minimum=1)
    reference_n = s["reference_n"] if reference_n is None else check_int(
        "reference_n", reference_n, minimum=2)

    def part(name):
        return None if partial_dir is None else Path(partial_dir) / f"{name}.partial"

    solver = dict(steps=s["steps"], method=s["method"], device=device, dtype=dtype)
    res = probing.probe(velocity, readout, latent_shape, n, k=k, seed=s["seed"],
                        batch_size=batch_size, pairs=True, paper=False, progress=progress,
                        partial_path=part("probe"), **solver)
    plain, plain_secs = probing.plain_outputs(velocity, readout, latent_shape,
                                              2 * n * (1 + k), seed=s["plain_seed"],
                                              batch_size=batch_size,
                                              partial_path=part("plain"), **solver)
    ref, ref_secs = probing.plain_outputs(velocity, readout, latent_shape, reference_n,
                                          seed=s["reference_seed"], batch_size=batch_size,
                                          partial_path=part("reference"), **solver)
    res["plain"], res["reference"] = plain, ref
    res["meta"]["seconds"].update(plain=plain_secs, reference=ref_secs)
    res["meta"].update(reference_n=reference_n, plain_n=2 * n * (1 + k),
                       plain_seed=s["plain_seed"], reference_seed=s["reference_seed"])
    return res


# ---------------------------------------------------------- estimators
def _jvps(name, x) -> torch.Tensor:
    x = torch.as_tensor(x).double()
    if x.ndim == 2:
        x = x.unsqueeze(1)
    if x.ndim != 3 or x.shape[2] != 2 or x.shape[0] < 2:
        raise ValueError(f"{name} must be (n, k, 2) JVPs of the two outputs (t, i) with "
                         f"n >= 2, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite")
    return x


def paper_terms(jvp) -> torch.Tensor:
    """Per-latent terms (n, 2, 2) of the paper's E[J J^T]: the k probes' mean of ``(J v)(J v)^T``; :ref:`sec_attributes`."""
    a = _jvps("jvp", jvp)
    return torch.einsum("nkp,nkq->npq", a, a) / a.shape[1]


def identity_terms(jz, jzr) -> torch.Tensor:
    """Per-pair terms (n, 2, 2) of the covariance identity: ``sym((J(z) v)(J(z_rho) v)^T)``, probes averaged (weights 1, rho stratified); :ref:`sec_attributes`."""
    a, b = _jvps("jz", jz), _jvps("jzr", jzr)
    if a.shape != b.shape:
        raise ValueError(f"jzr must have the shape of jz, {tuple(a.shape)}, got {tuple(b.shape)}")
    g = torch.einsum("nkp,nkq->npq", a, b) / a.shape[1]
    return 0.5 * (g + g.mT)


def corr_of_mean(terms) -> float:
    """corr = M01 / sqrt(M00 M11) of the mean of (n, 2, 2) terms (NaN where a diagonal entry is not positive); :ref:`sec_attributes`."""
    m = torch.as_tensor(terms, dtype=torch.float64).mean(0)
    if not (m[0, 0] > 0 and m[1, 1] > 0):
        return math.nan
    return float(m[0, 1] / torch.sqrt(m[0, 0] * m[1, 1]))


def _sample_corr(x) -> float:
    x = torch.as_tensor(x, dtype=torch.float64)
    c = x - x.mean(0)
    den = torch.sqrt((c[:, 0] ** 2).sum() * (c[:, 1] ** 2).sum())
    return float((c[:, 0] * c[:, 1]).sum() / den) if den > 0 else math.nan


def _tails(terms) -> dict:
    """Hill index and top-1% share of each entry's per-latent terms; the smallest index decides."""
    s = SOFT_STUDY
    out = {}
    for name, (p, q) in (("tt", (0, 0)), ("ii", (1, 1)), ("ti", (0, 1))):
        v = terms[:, p, q]
        ok = len(v) >= 3 and bool((v != 0).any())
        out[name] = {"hill": intervals.hill_index(v, s["hill_frac"]) if ok else math.nan,
                     "tail_share": intervals.tail_share(v, s["tail_frac"]) if ok else math.nan}
    hills = [d["hill"] for d in out.values() if d["hill"] == d["hill"]]
    out["hill_min"] = min(hills) if hills else math.nan
    return out


def _estimate(terms, seed) -> dict:
    """corr of the mean of per-latent terms with its interval and tails."""
    s = SOFT_STUDY
    value = corr_of_mean(terms)
    tails = _tails(terms)
    heavy = not tails["hill_min"] >= s["hill_min"]
    if heavy and len(terms) >= s["groups"]:
        _, _, lo, hi = group_spread(corr_of_mean, terms, groups=s["groups"])
        how = f"range over {s['groups']} disjoint groups (Hill index {tails['hill_min']:.2g})"
    else:
        _, lo, hi = intervals.bootstrap_ci(corr_of_mean, terms, n_boot=s["n_boot"],
                                           alpha=1 - s["level"],
                                           generator=torch.Generator().manual_seed(seed))
        how = "percentile bootstrap over latents"
    return {"value": value, "interval": [float(lo), float(hi)], "interval_kind": how,
            "tails": tails}


def _plain(x, seed) -> dict:
    s = SOFT_STUDY
    x = torch.as_tensor(x, dtype=torch.float64)
    value, lo, hi = intervals.bootstrap_ci(_sample_corr, x, n_boot=s["n_boot"],
                                           alpha=1 - s["level"],
                                           generator=torch.Generator().manual_seed(seed))
    z = float(torch.special.ndtri(torch.tensor(0.5 + s["level"] / 2, dtype=torch.float64)))
    return {"value": float(value), "interval": [float(lo), float(hi)], "n": len(x),
            "stderr": (float(hi) - float(lo)) / (2 * z)}


def soft_summary(res: dict) -> dict:
    """The study's numbers from ``run_soft_study``'s tensors: paper, identity, plain at equal compute, reference and exact, with intervals, tails and errors; :ref:`sec_attributes`.

    ``res`` holds ``out``, ``jvp``, ``rho``, ``out_pair``, ``jvp_pair``
    (``probing.probe``), ``plain`` (at least 2 n (1 + k) rows) and
    ``reference``. The paper's and the identity's point estimates agree
    with ``covariance_from_pairs`` (checked here).
    """
    seed = SOFT_STUDY["interval_seed"]
    jz, jzr = _jvps("res['jvp']", res["jvp"]), _jvps("res['jvp_pair']", res["jvp_pair"])
    n, k, _ = jz.shape
    est = covariance_from_pairs(jz, jzr, torch.as_tensor(res["rho"]).double(),
                                fz=torch.as_tensor(res["out"]).double(),
                                fzr=torch.as_tensor(res["out_pair"]).double())
    paper, ident = paper_terms(jz), identity_terms(jz, jzr)
    paper_moment = moment_to_corr(paper.mean(0))
    for got, want in ((corr_of_mean(ident), float(est.corr[0, 1])),
                      (corr_of_mean(paper), float(paper_moment[0, 1]))):
        if not (math.isnan(got) and math.isnan(want)) and abs(got - want) > 1e-9:
            raise RuntimeError(f"the per-latent terms give {got}, the reduction {want}")
    plain = torch.as_tensor(res["plain"], dtype=torch.float64)
    need = 2 * n * (1 + k)
    if plain.ndim != 2 or plain.shape[1] != 2 or len(plain) < need:
        raise ValueError(f"res['plain'] must hold at least 2 n (1 + k) = {need} rows of (t, i), "
                         f"got {tuple(plain.shape)}")
    exact = morpho.scm_moments()["corr_ti"]
    out = {"n": n, "k": k, "exact": exact,
           "paper": _estimate(paper, seed), "identity": _estimate(ident, seed),
           "plain_paper": _plain(plain[:n * (1 + k)], seed),
           "plain_identity": _plain(plain[:need], seed),
           "reference": _plain(res["reference"], seed),
           "identity_cov": est.cov.tolist(), "paper_moment": paper.mean(0).tolist()}
    ref = out["reference"]["value"]
    for name in ("paper", "identity", "plain_paper", "plain_identity", "reference"):
        out[name]["error_exact"] = out[name]["value"] - exact
        out[name]["error_reference"] = out[name]["value"] - ref
    out["verdict"] = {"paper": soft_verdict(out, "paper"),
                      "identity": soft_verdict(out, "identity")}
    return out


def soft_verdict(summary: dict, estimator: str = "paper") -> dict:
    """``SOFT_STUDY["rule"]`` on a summary: does the estimator (``"paper"`` or ``"identity"``) rescue the method, fail it, or is the test inconclusive; :ref:`sec_attributes`.

    ``summary`` needs ``estimator``, ``plain_<estimator>`` (the plain
    samples at its equal compute: ``value``, ``interval``, ``stderr``) and
    ``reference`` (``value``, ``interval``). Returns ``verdict``
    (``"rescues"``, ``"does not rescue"``, ``"inconclusive"``), the two
    criteria and a sentence.
    """
    if estimator not in ("paper", "identity"):
        raise ValueError(f"estimator must be 'paper' or 'identity', got {estimator!r}")
    s = SOFT_STUDY
    e, p, r = summary[estimator], summary[f"plain_{estimator}"], summary["reference"]
    nums = [e["value"], *e["interval"], p["stderr"], r["value"], *r["interval"]]
    if any(not np.isfinite(v) for v in nums):
        return {"verdict": "inconclusive", "text": "a number of the comparison is undefined"}
    half = (r["interval"][1] - r["interval"][0]) / 2
    if half > s["max_reference_halfwidth"]:
        return {"verdict": "inconclusive",
                "text": (f"no power: the flow's own corr(t, i) is known only to +-{half:.3f} "
                         f"(limit {s['max_reference_halfwidth']})")}
    meets = e["interval"][0] <= r["interval"][1] and r["interval"][0] <= e["interval"][1]
    err = abs(e["value"] - r["value"])
    tol = s["efficiency_factor"] * p["stderr"]
    efficient = err <= tol
    verdict = "rescues" if meets and efficient else "does not rescue"
    why = [] if meets else [f"its interval [{e['interval'][0]:+.3f}, {e['interval'][1]:+.3f}] "
                            f"misses the flow's [{r['interval'][0]:+.3f}, {r['interval'][1]:+.3f}]"]
    if not efficient:
        why.append(f"its error {err:.3f} exceeds {s['efficiency_factor']:g} standard errors of "
                   f"plain samples at equal compute ({tol:.3f})")
    text = (f"{estimator}: {e['value']:+.3f} against the flow's {r['value']:+.3f} "
            f"(error {err:.3f}, tolerance {tol:.3f}): {verdict}"
            + (f" ({'; '.join(why)})" if why else ""))
    return {"verdict": verdict, "meets_reference": bool(meets), "efficient": bool(efficient),
            "error": err, "tolerance": tol, "text": text}
