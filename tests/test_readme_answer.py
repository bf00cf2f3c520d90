"""The README's first answer (issue 34, item 5) quotes the book's own numbers:
every figure it states is one the golden byom chapter prints."""
import json
import re

from flowjac.utils import repo_root

ROOT = repo_root()


def _byom_outputs() -> str:
    nb = json.loads((ROOT / "notebooks" / "byom.ipynb").read_text())
    text = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            # printed text, shown tables and the verdicts the chapter glues
            text.append("".join(data.get("text/plain", "")) + "".join(data.get("text/markdown", ""))
                        + "".join(data.get("application/papermill.record/text/plain", ""))
                        + "".join(out.get("text", "")))
    return "\n".join(text)


def test_the_readme_numbers_are_the_books():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What flowjac tells you about your flow", 1)[1].split("\n## ", 1)[0]
    printed = _byom_outputs()
    # the error table: one row per estimator, one column per flow
    rows = {}
    for label in ("zeros (trivial)", "plain samples (1,500, equal compute)",
                  "paper's E[JJ^T] (250 pairs' JVPs)", "covariance identity (250 pairs)"):
        rows[label] = [float(v) for v in re.findall(re.escape(label) + r"\s+([0-9.]+)", printed)]
        assert len(rows[label]) == 2, (label, rows[label])
    zeros, plain, upper, ident = rows.values()
    for flow in (0, 1):
        for value in (zeros[flow], plain[flow], upper[flow], ident[flow]):
            assert f"{value:.4f}" in section, value
    for flow in (0, 1):
        ratio = f"{upper[flow] / plain[flow]:.1f}×"
        assert ratio in section, ratio
        assert f"E[JJ^T] is {ratio[:-1]}x as far" in printed
    assert "1,500 plain samples" in section and "250 latent pairs" in section
