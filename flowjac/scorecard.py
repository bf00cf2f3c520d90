"""The seed documents' claims and their verdicts, collected from executed chapters; :ref:`sec_scorecard`.

Every ``Claim`` carries its document's own words (``quote``, verbatim from
the seed text in ``shared/seeds/``) and their place (``where``). Where a
chapter tests a consequence rather than the words themselves, ``tested``
says which consequence and why. A reading the book gives that the document
does not make is a separate claim of kind ``"implied"`` (its ``tested``
says so); the document's own statement is kind ``"stated"``.

Quotations follow two conventions, both undone by ``quote_fragments``
before a quote is matched against the seed text: words in angle brackets
(⟨do⟩) restore what the text extraction lost, ⟨…⟩ marks lost mathematics
that is not restored, and an ellipsis between spaces joins two fragments
of one passage.

A chapter decides a verdict and calls ``run.claim(key, holds, value, ...)``
(``flowjac.chapter.Run.claim``): the verdict is written to the chapter's
``claims.json`` and glued into its notebook (``myst_nb.glue``, name
``claim:<key>``). The scorecard page reads the glued records back from the
executed notebooks of the same build (``collect``) and lists every claim of
``CLAIMS`` (``rows``). Five verdicts: ``holds``, ``fails``, ``inconclusive``
(the chapter states the test's power and it is not enough),
``provisional`` (computed here: a shipped model that the claim rests on
fails a gate in ``flowjac/weights/manifest.json``) and ``untested-here``
(no chapter of the build decided it).

The module is over 400 lines because ``CLAIMS`` quotes every claim with
its place and what is tested; the code is the last third.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Claim", "CLAIMS", "VERDICTS", "KINDS", "SOURCES", "EXPERIMENTS",
           "ClaimRecord", "collect", "rows", "quote_fragments", "seed_dir",
           "failing_models", "count_by_verdict", "experiment_verdicts"]

VERDICTS = ("holds", "fails", "inconclusive", "provisional", "untested-here")
KINDS = ("stated", "implied")
GLUE_PREFIX = "claim:"

PAPER = "the paper"
TALK = "Massias et al. (2025), talk"
UNIFIED = "the unified-view note"

# the seed file that each source's quotes come from (shared/seeds/README.md)
SOURCES = {PAPER: "000_73240f4e01077e39.txt",
           TALK: "001_95d562f5614c0e85.txt",
           UNIFIED: "003_151117810e586cda.txt"}

# independent experiments: claims decided on the same model, data and run
# share one, so the headline counts them once
EXPERIMENTS = {
    "gaussian": "closed forms: linear generator and one Gaussian",
    "fig1-mlp": "an MLP flow between N(0, 1) and N(0, 1)",
    "fig1-drift": "the authors' 1D closed-form drift (SymPy)",
    "mixture-table4": "the Table 4 mixture, closed form",
    "mixture-two": "two-component mixtures across separations",
    "mnist-fives": "the shipped flow of MNIST fives",
    "jvp-code": "the authors' JVP code",
    "scm-flow": "the shipped SCM flow and its classifier",
    "scm-labels": "PC on the SCM's labels (no flow)",
    "celeba": "CelebA",
    "efm-closed-form": "the closed-form optimum û* on training sets",
    "efm-target": "the regression target across dimensions",
    "efm-training": "CFM and EFM trained on 2D moons",
    "efm-hybrid": "the hybrid û*-then-network sampler",
    "unified-table": "Table I of the unified view (SymPy)",
    "unified-time": "time sampling (no training)",
}


@dataclass(frozen=True)
class Claim:
    """One claim of a seed document, in its own words and place; :ref:`sec_scorecard`."""

    key: str
    source: str                 # which document (a key of SOURCES)
    where: str                  # its place, as the document names it
    quote: str                  # the document's words (see quote_fragments)
    experiment: str             # a key of EXPERIMENTS
    tested: str = ""            # the consequence tested, where not the words
    kind: str = "stated"        # "stated" or "implied" (the book's reading)
    rests_on: tuple = ()        # shipped models (pretrained.NAMES keys)
    untested: str = ""          # why no chapter decides it yet, if none does

    @property
    def statement(self) -> str:
        """The quote (the name the page used before quotes); :ref:`sec_scorecard`."""
        return self.quote


CLAIMS: tuple[Claim, ...] = (
    # --- the paper: abstract, introduction, conclusion ----------------------
    Claim("abstract_pixels", PAPER, "Section 7 (Discussion and Conclusion)",
          "we demonstrate that the empirical Jacobian can recover dependency "
          "structures between generated features, both at the pixel level",
          "mnist-fives",
          tested="At the pixel level on MNIST fives: the JVP second moment "
          "against the training data's correlations, for the pair of Table 5 "
          "and the patch of Figure 3 together (the book's flow of fives; the "
          "paper's weights are not available).",
          rests_on=("mnist-fives",)),
    Claim("abstract_attributes", PAPER, "Abstract",
          "composing the flow with an attribute classifier yields an "
          "attribute-level JVP estimator that recovers empirical correlations "
          "on MNIST and CelebA", "scm-flow",
          tested="No CelebA flow ships with the book: the consequence is "
          "tested on the binary SCM, whose label correlations are exact, "
          "through the shipped flow and classifier.", rests_on=("scm",)),
    Claim("abstract_conditioning", PAPER, "Abstract",
          "Conditioning on small classifier-Jacobian norms reduces "
          "correlations in a way consistent with a hypothesized common-cause "
          "structure, while we emphasize that this conditioning is not a "
          "formal ⟨do⟩-intervention.", "scm-flow",
          tested="What the sentence claims, on the SCM with a known common "
          "cause: does selecting latents by a small JVP norm of the cause "
          "lower the correlation of its effects, with the test's power "
          "stated. Nothing causal is scored: the paper says its result "
          "'does not constitute definitive causal evidence' (Section 6.4).",
          rests_on=("scm",),
          untested="Decided in the causal-structures chapter "
          "(sec_causal_structures_sweep); untested only in a build that "
          "leaves that chapter out."),
    Claim("abstract_causal", PAPER, "Section 3.2.2",
          "Ultimately, if one can (partially) recover the SCM, the causal "
          "structure of the model (and, by extension, the data) can be "
          "explored and understood via the flow matching model.", "scm-flow",
          kind="implied",
          tested="The book's reading, not the paper's words: that selecting "
          "latents by a small Jacobian norm reveals causal structure (moves "
          "the effect correlations as causal reasoning predicts for a "
          "common cause, a chain and a collider). The paper says its "
          "conditioning 'is not a formal ⟨do⟩-intervention' (abstract); its "
          "own claim is abstract_conditioning.", rests_on=("scm",)),
    Claim("normalised_mixture", PAPER,
          "Section 1 (contributions); the normalised estimator: Section 5.3",
          "Introduce a JVP-based estimator for dependency structure and "
          "validate it on synthetic benchmarks and MNIST pixel correlations.",
          "mixture-two",
          tested="The consequence on a synthetic benchmark whose answer is "
          "known: the normalised estimator ('When we report a correlation "
          "matrix, we use the normalized version', Section 5.3) on the "
          "mixture N(±s·u, I/4) rotated off the axes, u = (e₁ + e₂)/√2, "
          "whose correlation is s²/(s² + ½), at its population value "
          "across separations s."),
    # --- Table 1 and Section 4.2 --------------------------------------------
    Claim("table1_linear", PAPER, "Table 1, row 'Linear'",
          "Linear | Constant | Constant", "gaussian",
          tested="The row says both Jacobians are constant (its other cells "
          "were lost in the text extraction). Tested: the consequence the "
          "table is there for ('how the local Jacobian, hence the outcome of "
          "the perturbation analysis, depends on the probabilistic "
          "structure', Section 4.2): for a linear generator E[(Jv)(Jv)ᵀ] "
          "equals the covariance of its output."),
    Claim("table1_gaussian", PAPER, "Section 4.2, on Table 1's row "
          "'Single–Gaussian flow'",
          "is linear in ⟨…⟩, so the Jacobian does not depend on ⟨…⟩. "
          "Perturbation analysis is therefore trivial, and ⟨…⟩ match the "
          "push-forward covariance exactly.", "gaussian",
          tested="For the flow to one Gaussian: E[(Jv)(Jv)ᵀ] against the "
          "covariance Σ of the flow's output."),
    Claim("table1_mixture", PAPER, "Table 1, row 'Mixture of Gaussians'",
          "Mixture of Gaussians | Pick ⟨k | A_k⟩ | Smooth but nonlinear, "
          "see Equation (4)", "mixture-table4",
          tested="The row's content: with the component held fixed the "
          "Jacobian is the constant A_k (the Jacobian of the component "
          "drift d_k, at every x), and under observation it is Equation "
          "(4), the blend plus the softmax-gradient term, which varies "
          "with x."),
    Claim("table1_mixture_moment", PAPER, "Table 1, row 'Mixture of "
          "Gaussians'", "Mixture of Gaussians | Pick ⟨k | A_k⟩ | Smooth "
          "but nonlinear, see Equation (4)", "mixture-two", kind="implied",
          tested="The book's reading, not the paper's words: that for a "
          "mixture, as for one Gaussian, the JVP second moment E[JJᵀ] "
          "approximates the covariance of the generated data. The row "
          "itself says nothing about covariances (table1_mixture)."),
    # --- Table 4, Section 6.2 ------------------------------------------------
    Claim("table4_numerical", PAPER, "Abstract; Table 4, column "
          "'Numerical vs. Analytical'",
          "In low-dimensional synthetic benchmarks, numerical JVPs recover "
          "the analytical Jacobians.", "mixture-table4",
          tested="Table 4's numerical column recomputed: forward differences "
          "(ε = 1e-6) against the closed-form Jacobian, in float64 and in "
          "float32, to tell the formula's error from round-off."),
    Claim("table4_intervention", PAPER, "Section 6.2, on Table 4's column "
          "'Intervention vs. Analytical'",
          "This suggests that if, both temporally and spatially, it is "
          "clear which component is dominating, the flow becomes a linear "
          "map.", "mixture-table4",
          tested="Where the gap between J and the blend Σγ_k A_k (the "
          "softmax-gradient term) vanishes: along the path at t = 0 and "
          "near t = 1 (and not mid-path, where the paper reports 0.300), "
          "and mid-path where one component dominates, on the points where "
          "the flow carries mass."),
    Claim("table4_intervention_midpath", PAPER, "Section 4.2",
          "Mixture of affine drifts. Even though the global field can be "
          "nonlinear, it can be decomposed into a convex blend of affine "
          "rules.", "mixture-table4", kind="implied",
          tested="The book's reading, not the paper's words: that the "
          "Jacobian is close to the blend Σγ_k A_k mid-path too. The paper "
          "blends the drifts, not their Jacobians, and reports a large gap "
          "mid-path itself (0.300 at t = 0.5, Table 4)."),
    # --- Tables 5 and 6, Figures ---------------------------------------------
    Claim("table5_pair", PAPER, "Section 6.3, Table 5",
          "Our JVP-based estimator recovers their empirical pairwise "
          "correlation (Table 5).", "mnist-fives",
          tested="The pixel pair of Table 5 on the book's shipped flow of "
          "fives (the paper's weights are not available).",
          rests_on=("mnist-fives",)),
    Claim("table6_selection", PAPER, "Section 6.4, Table 6",
          "When we condition on samples with near-zero Jacobian norm for "
          "attribute 19, the correlation drops close to zero.", "scm-flow",
          tested="No CelebA flow ships with the book: on the SCM, where C "
          "is a known common cause of A and B, among latents with a small "
          "JVP norm of C the JVP correlation of A and B should drop to "
          "near zero.", rests_on=("scm",)),
    Claim("fig1_contraction", PAPER, "Section 6.1, Figure 1",
          "One can observe that in Figure 1 it is apparent that the "
          "empirical results align with our theoretical work.", "fig1-mlp",
          tested="A flow learned between N(0, 1) and N(0, 1) against the "
          "analytic flow, which contracts to x₀/√2 at t = 1/2."),
    Claim("fig1_closed_form", PAPER, "Abstract; Figure 1's analytic curves",
          "We derive closed-form expressions for the optimal drift and its "
          "Jacobian in Gaussian and mixture-of-Gaussian settings",
          "fig1-drift",
          tested="The consequence for Figure 1: the 1D closed-form drift "
          "the authors plotted should be the flow-matching drift, so it "
          "must return N(0, 1) to N(0, 1)."),
    Claim("fig2_mixture", PAPER, "Section 4.1.2, Equation (3); Figure 2",
          "Using conditional Gaussian identities (Appendix B), we obtain "
          "the mixture drift by marginalizing over", "mixture-table4",
          tested="Equation (3)'s drift against Monte-Carlo conditional means "
          "in small balls, and its Jacobian (4) against autograd, on the "
          "mixture of Figure 2 and Table 4."),
    Claim("fig3_patch", PAPER, "Section 6.3, Figure 3",
          "We also observed similar behavior for larger pixel regions, but "
          "omit those results for brevity.", "mnist-fives",
          tested="The results are omitted, so the book tests Figure 3's "
          "6×6 patch: JVP correlations against the data's, with held-out "
          "real fives as the noise floor.", rests_on=("mnist-fives",)),
    Claim("fig4_labels", PAPER, "Section 6.4, Figure 4",
          "we first estimated a conditional dependence structure directly "
          "from the 40 binary attribute labels provided with the dataset",
          "scm-labels",
          tested="CelebA is not available: the analogue is PC on the SCM's "
          "labels against its true graph.",
          untested="Decided in the causal-structures chapter "
          "(sec_causal_structures_pc); untested only in a build that leaves "
          "that chapter out."),
    Claim("fig4_structures", PAPER, "Section 6.4, Figure 4",
          "we first estimated a conditional dependence structure directly "
          "from the 40 binary attribute labels provided with the dataset",
          "scm-flow", kind="implied",
          tested="The book's reading, not the paper's words: that PC on the "
          "flow's generated samples (read by the classifier) recovers the "
          "data's graph. The paper ran PC on the dataset's labels "
          "(fig4_labels).", rests_on=("scm",)),
    Claim("fig5_celeba", PAPER, "Section 6.4, Figure 5",
          "Figure 5(b) shows the estimated attribute correlation matrix from "
          "our Jacobian-vector-product-based method, which is visually close "
          "to the ground truth.", "celeba"),
    Claim("appc_jvp", PAPER, "Section 5.1; Appendix C",
          "In practice, we use finite differences with small ⟨…⟩ and "
          "validate the stability of the estimate by comparing to "
          "automatic-differentiation JVPs", "jvp-code",
          tested="The reference the finite differences are validated "
          "against: the authors' automatic-differentiation JVP (their code) "
          "should return Jv."),
    # --- the talk on the closed form (Bertrand, Gagneux, Massias, Emonet) ---
    Claim("efm_ustar_copies", TALK, "slide 'Flow matching should not work'",
          "it can only generate training points!", "efm-closed-form",
          tested="Integrating the closed-form û* from fresh latents, in 2D "
          "and on MNIST: the share of endpoints on a training point."),
    Claim("efm_target", TALK, "slide 'Issues of intuitions from small "
          "dimension'",
          "Stochasticity only occurs for very small t as dimension "
          "increases", "efm-target"),
    Claim("efm_vs_cfm", TALK, "slide 'Refuting the stochasticity argument: "
          "regressing against \\hat{u}^*'",
          "Learning with a non-stochastic target *does not* degrade "
          "performance", "efm-training",
          tested="Performance read as generalisation: a network trained on "
          "û* (EFM) should memorise no more than the same network trained "
          "on x₁ − x₀ (CFM)."),
    Claim("efm_small_t", TALK, "slide 'Summary'",
          "failure of u_θ to learn \\hat{u}^* for small t is critical",
          "efm-hybrid",
          tested="The talk's hybrid sampler (û* on [0, τ], the network "
          "after): where the network departs from û* is what keeps it from "
          "copying.", rests_on=("mnist-fives",)),
    # --- the unified-view note ------------------------------------------------
    Claim("unified_rho", UNIFIED, "Section IV, Table I",
          "Surprisingly, the Pearson correlation coefficients are zeros for "
          "the models in [13, 28, 20].", "unified-table"),
    Claim("unified_det", UNIFIED, "Section IV, Table I",
          "A popular strategy in [13, 28, 18, 20] is to choose the target as "
          "a time-varying linear combination of the ground truth data and "
          "the noise such that the determinant is independent of ⟨t⟩ as "
          "demonstrated in Table I.", "unified-table"),
    Claim("unified_amplification", UNIFIED, "Section I; Table I",
          "When the network is evaluated at signal-to-noise ratios around "
          "zeros, the fitting error of the neural network is amplified "
          "significantly when the output of the neural network is adopted "
          "to implicitly predict the data.", "unified-table",
          tested="Table I's amplification factors: unbounded for noise "
          "prediction as t → 1, at most 1 for v-prediction, TrigFlow and "
          "rectified flow."),
    Claim("unified_logit_normal", UNIFIED, "Section IV",
          "Instead of sampling using a uniform distribution ⟨…⟩, Esser et "
          "al. [7] proposed sampling from a logit-normal distribution that "
          "emphasizes the middle time-steps.", "unified-time",
          tested="That logit-normal time sampling helps rectified-flow "
          "training, which the note credits to Esser et al."),
)


class ClaimRecord(dict):
    """A decided claim as glued into a notebook (JSON in, JSON out); :ref:`sec_scorecard`."""

    # text/plain only: nbformat refuses a dict under a glue prefix
    def __repr__(self):
        return json.dumps(dict(self), sort_keys=True)


def _by_key() -> dict[str, Claim]:
    return {c.key: c for c in CLAIMS}


def _normalise(text: str) -> str:
    return " ".join(text.split())


def quote_fragments(quote: str) -> list[str]:
    """The verbatim fragments of a quote: restorations in angle brackets dropped, split at each spaced ellipsis, whitespace normalised; :ref:`sec_scorecard`."""
    out = []
    for part in quote.split(" … "):
        part = _normalise(re.sub(r"⟨[^⟩]*⟩", " ", part))
        if part:
            out.append(part)
    return out


def seed_dir(root=None) -> Path | None:
    """The folder of seed documents (``shared/seeds`` beside the repository), or None; :ref:`sec_scorecard`."""
    from flowjac.base import repo_root

    root = Path(root) if root is not None else repo_root()
    for cand in (root / "shared" / "seeds", root.parent / "shared" / "seeds"):
        if cand.is_dir():
            return cand
    return None


def seed_text(source: str, root=None) -> str | None:
    """The whitespace-normalised text of ``source``'s seed document, or None if absent; :ref:`sec_scorecard`."""
    folder = seed_dir(root)
    if folder is None or not (folder / SOURCES[source]).is_file():
        return None
    return _normalise((folder / SOURCES[source]).read_text(encoding="utf-8"))


def failing_models(manifest: dict | None = None) -> dict[str, list[str]]:
    """``{name: [parts whose gates do not pass]}`` for each shipped model that fails a gate; :ref:`sec_scorecard`.

    ``manifest`` is ``flowjac/weights/manifest.json`` as a dict (read from
    the package when None); a part listed by ``pretrained.NAMES`` but
    missing from the manifest, or without gates, counts as failing.
    """
    from flowjac.models.pretrained import NAMES, WEIGHTS_DIR

    if manifest is None:
        path = Path(WEIGHTS_DIR) / "manifest.json"
        manifest = json.loads(path.read_text()) if path.exists() else {}
    parts = manifest.get("parts", {})
    out = {}
    for name, names in NAMES.items():
        bad = [p for p in names
               if not parts.get(p, {}).get("gates", {}).get("passed", False)]
        if bad:
            out[name] = bad
    return out


def collect(notebook_dir) -> dict[str, dict]:
    """Read every glued claim record from the executed notebooks in ``notebook_dir``; :ref:`sec_scorecard`.

    Returns ``{key: record}``; a key decided by two chapters keeps the
    first chapter's record (in file-name order) and lists the others under
    ``"also"``. The scorecard's own notebook is skipped.
    """
    import nbformat

    found: dict[str, dict] = {}
    for nb_path in sorted(Path(notebook_dir).glob("*.ipynb")):
        if nb_path.stem == "scorecard":
            continue
        nb = nbformat.read(nb_path, as_version=4)
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                name = out.get("metadata", {}).get("scrapbook", {}).get("name", "")
                if not name.startswith(GLUE_PREFIX):
                    continue
                data = out.get("data", {})
                text = next((v for m, v in data.items()
                             if m.endswith("text/plain")), None)
                if text is None:
                    continue
                rec = json.loads("".join(text) if isinstance(text, list)
                                 else text)
                key = name[len(GLUE_PREFIX):]
                rec.setdefault("chapter", nb_path.stem)
                if key in found:
                    found[key].setdefault("also", []).append(rec["chapter"])
                else:
                    found[key] = rec
    return found


CHAPTER_VERDICTS = ("holds", "fails", "inconclusive", "untested-here")


def rows(found: dict[str, dict], failing: dict | None = None) -> list[dict]:
    """One row per claim of ``CLAIMS`` with its verdict, provisional where a model it rests on fails a gate; :ref:`sec_scorecard`.

    ``found`` is ``collect``'s result; ``failing`` is ``failing_models()``
    (computed when None). A claim that no chapter decided reads
    "untested-here" with the claim's ``untested`` reason; a decided claim
    whose ``rests_on`` names a failing model reads "provisional", and the
    chapter's own verdict stays in ``chapter_verdict``.
    """
    unknown = sorted(set(found) - set(_by_key()))
    if unknown:
        raise ValueError(f"chapters recorded claims that CLAIMS does not "
                         f"list: {unknown}")
    if failing is None:
        failing = failing_models()
    out = []
    for c in CLAIMS:
        rec = found.get(c.key)
        row = {"key": c.key, "source": c.source, "where": c.where,
               "quote": c.quote, "statement": c.quote, "tested": c.tested,
               "kind": c.kind, "experiment": c.experiment,
               "rests_on": list(c.rests_on), "failing_models": []}
        if rec is None:
            row.update(verdict="untested-here", chapter_verdict="untested-here",
                       value="", detail=c.untested or "no chapter of this "
                       "build decided it", section=None, chapter=None)
        else:
            verdict = rec["verdict"]
            if verdict not in CHAPTER_VERDICTS:
                raise ValueError(f"claim {c.key!r}: a chapter recorded the "
                                 f"verdict {verdict!r}; allowed are "
                                 f"{CHAPTER_VERDICTS}")
            bad = sorted({p for m in c.rests_on for p in failing.get(m, [])})
            row.update(chapter_verdict=verdict, value=rec.get("value", ""),
                       detail=rec.get("detail", ""),
                       section=rec.get("section"), chapter=rec.get("chapter"))
            row["verdict"] = verdict
            if bad and verdict != "untested-here":
                row["verdict"] = "provisional"
                row["failing_models"] = bad
        out.append(row)
    return out


def count_by_verdict(table: list[dict], kind: str | None = None) -> dict[str, int]:
    """``{verdict: number of rows}`` over ``VERDICTS``, for one ``kind`` of claim or all; :ref:`sec_scorecard`."""
    sel = [r for r in table if kind is None or r["kind"] == kind]
    return {v: sum(r["verdict"] == v for r in sel) for v in VERDICTS}


# an experiment's verdict is the first of these that one of its claims has
EXPERIMENT_ORDER = ("provisional", "fails", "inconclusive", "holds",
                    "untested-here")


def experiment_verdicts(table: list[dict], kind: str = "stated") -> dict[str, str]:
    """One verdict per independent experiment, from its claims of ``kind``; :ref:`sec_scorecard`.

    An experiment is provisional if any of its claims is, else fails if
    any fails, else inconclusive if any is, else holds if any holds; it is
    untested-here only if all its claims are. Experiments without a claim
    of ``kind`` are left out.
    """
    by_exp: dict[str, set] = {}
    for r in table:
        if r["kind"] == kind:
            by_exp.setdefault(r["experiment"], set()).add(r["verdict"])
    return {e: next(v for v in EXPERIMENT_ORDER if v in states)
            for e, states in by_exp.items()}
