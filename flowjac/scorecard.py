"""The paper's claims and their verdicts, collected from executed chapters; :ref:`sec_scorecard`.

A chapter decides a verdict and calls ``run.claim(key, holds, value, ...)``
(``flowjac.utils.Run.claim``): the verdict is written to the chapter's
``claims.json`` and glued into its notebook (``myst_nb.glue``, name
``claim:<key>``). The scorecard page reads the glued records back from the
executed notebooks of the same build (``collect``) and lists every claim of
``CLAIMS``; a claim that no executed chapter decided reads "untested-here".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Claim", "CLAIMS", "VERDICTS", "ClaimRecord", "collect", "rows"]

VERDICTS = ("holds", "fails", "untested-here")
GLUE_PREFIX = "claim:"


@dataclass(frozen=True)
class Claim:
    """One claim of a seed document, as the book states it; :ref:`sec_scorecard`."""

    key: str
    source: str      # which document
    where: str       # where in that document
    statement: str   # the claim, as the document makes it


PAPER = "the paper"
EFM = "Bertrand et al. (2025)"
UNIFIED = "the unified-view note"

CLAIMS: tuple[Claim, ...] = (
    Claim("abstract_pixels", PAPER, "abstract",
          "The JVP second moment of a trained flow recovers the correlation "
          "between pixels of the data."),
    Claim("abstract_attributes", PAPER, "abstract",
          "Through a classifier, the JVP second moment recovers the "
          "dependencies between attributes of the data."),
    Claim("abstract_causal", PAPER, "abstract",
          "Selecting latents by a small Jacobian norm reveals causal "
          "structure (a fall in correlation marks a common cause)."),
    Claim("table1_linear", PAPER, "Table 1, linear row",
          "For a linear generator the intervention Jacobian moment "
          "E[(Jv)(Jv)ᵀ] equals the observation covariance."),
    Claim("table1_gaussian", PAPER, "Table 1, single-Gaussian row",
          "For the flow to one Gaussian the intervention Jacobian moment "
          "equals the observation covariance Σ."),
    Claim("table1_mixture", PAPER, "Table 1, mixture row",
          "For a mixture of Gaussians the intervention Jacobian moment "
          "approximates the observation covariance."),
    Claim("table4_numerical", PAPER, "Table 4, numerical column",
          "The closed-form mixture Jacobian agrees with a numerical "
          "Jacobian (the reported gap is numerical error)."),
    Claim("table4_intervention", PAPER, "Table 4, intervention column",
          "The mixture Jacobian is close to the blend of the components' "
          "Jacobians (the softmax-gradient term is small)."),
    Claim("table5_pair", PAPER, "Table 5",
          "On MNIST fives the JVP estimate of a pixel pair's correlation "
          "matches the data's."),
    Claim("table6_selection", PAPER, "Table 6",
          "Keeping latents with a small Jacobian norm of the common cause "
          "removes the correlation of its effects, as conditioning does."),
    Claim("fig1_contraction", PAPER, "Figure 1",
          "A flow learned between N(0,1) and N(0,1) matches the analytic "
          "flow, which contracts to x₀/√2 at t = 1/2."),
    Claim("fig1_closed_form", PAPER, "Figure 1, closed form",
          "The authors' 1D closed-form drift is the flow-matching drift "
          "(it returns N(0,1) to N(0,1))."),
    Claim("fig2_mixture", PAPER, "Figure 2",
          "The mixture flow's drift and its Jacobian follow the closed form "
          "at the plotted times."),
    Claim("fig3_patch", PAPER, "Figure 3",
          "The JVP estimate of a 6×6 patch's pixel correlations matches the "
          "data's."),
    Claim("fig4_structures", PAPER, "Figure 4",
          "Causal discovery (PC) on the flow's generated samples recovers "
          "the data's causal graph."),
    Claim("fig5_celeba", PAPER, "Figure 5",
          "On CelebA the JVP attribute correlations resemble the labels' "
          "correlations over 40 attributes."),
    Claim("appc_jvp", PAPER, "Appendix C",
          "The authors' automatic-differentiation JVP estimate equals Jv."),
    Claim("efm_ustar_copies", EFM, "closed form",
          "Following the closed-form optimum û* only reproduces training "
          "points."),
    Claim("efm_target", EFM, "target stochasticity",
          "In high dimension the regression target is almost deterministic "
          "except at small t, and the more so the higher the dimension."),
    Claim("efm_vs_cfm", EFM, "EFM vs CFM",
          "Regressing on û* instead of x₁ − x₀ does not make the network "
          "memorise."),
    Claim("efm_small_t", EFM, "hybrid sampler",
          "Where the network departs from û* at small t is what keeps it "
          "from memorising (a hybrid û*-then-network sampler copies)."),
    Claim("unified_rho", UNIFIED, "Table I, correlation",
          "For unit-variance data v-prediction, EDM's F and TrigFlow targets "
          "are uncorrelated with the network input at every t."),
    Claim("unified_det", UNIFIED, "Table I, determinant",
          "The EDM and consistency-model determinants do not depend on t."),
    Claim("unified_amplification", UNIFIED, "Table I, amplification",
          "Noise prediction amplifies a target error without bound as "
          "t → 1; v-prediction, TrigFlow and rectified flow by at most 1."),
    Claim("unified_logit_normal", UNIFIED, "time sampling",
          "Logit-normal time sampling helps rectified-flow training."),
)


class ClaimRecord(dict):
    """A decided claim as glued into a notebook (JSON in, JSON out); :ref:`sec_scorecard`."""

    # text/plain only: nbformat refuses a dict under a glue prefix
    def __repr__(self):
        return json.dumps(dict(self), sort_keys=True)


def _by_key() -> dict[str, Claim]:
    return {c.key: c for c in CLAIMS}


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


def rows(found: dict[str, dict]) -> list[dict]:
    """One row per claim of ``CLAIMS``: its verdict, number and section, or "untested-here"; :ref:`sec_scorecard`."""
    unknown = sorted(set(found) - set(_by_key()))
    if unknown:
        raise ValueError(f"chapters recorded claims that CLAIMS does not "
                         f"list: {unknown}")
    out = []
    for c in CLAIMS:
        rec = found.get(c.key)
        if rec is None:
            out.append({"key": c.key, "source": c.source, "where": c.where,
                        "statement": c.statement, "verdict": "untested-here",
                        "value": "", "detail": "no chapter of this build "
                        "decided it", "section": None, "chapter": None})
        else:
            out.append({"key": c.key, "source": c.source, "where": c.where,
                        "statement": c.statement, "verdict": rec["verdict"],
                        "value": rec.get("value", ""),
                        "detail": rec.get("detail", ""),
                        "section": rec.get("section"),
                        "chapter": rec.get("chapter")})
    return out
