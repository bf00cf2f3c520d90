"""The scorecard mechanism: chapters record verdicts, the scorecard page reads them back."""
import json

import nbformat
import pytest

import flowjac as fj
from flowjac import scorecard


def _glued_notebook(path, records):
    """A notebook whose outputs are glued claim records, as myst_nb.glue writes them."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("run.claim(...)")
    cell.outputs = [nbformat.v4.new_output(
        "display_data",
        data={"application/papermill.record/text/plain": json.dumps(rec)},
        metadata={"scrapbook": {"name": f"claim:{rec['key']}",
                                "mime_prefix": "application/papermill.record/"}})
        for rec in records]
    nb.cells.append(cell)
    nbformat.write(nb, path)


def test_claim_writes_json_and_refuses_unknown_keys(tmp_path):
    run = fj.setup("demo", "quick", 0, "cpu", tmp_path)
    rec = run.claim("table1_linear", True, "0.40", section="sec_gaussian")
    assert rec["verdict"] == "holds" and rec["chapter"] == "demo"
    run.claim("table5_pair", False, "0.51")
    run.claim("fig5_celeba", None, detail="no CelebA")
    stored = json.loads((run.output_dir / "claims.json").read_text())
    assert {k: v["verdict"] for k, v in stored.items()} == {
        "table1_linear": "holds", "table5_pair": "fails",
        "fig5_celeba": "untested-here"}
    with pytest.raises(ValueError, match="key must be one of"):
        run.claim("no_such_claim", True)


def test_collect_and_rows_mark_missing_claims_untested(tmp_path):
    _glued_notebook(tmp_path / "gaussian.ipynb", [
        dict(key="table1_linear", verdict="holds", value="0.40", detail="",
             section="sec_gaussian_table1", chapter="gaussian")])
    _glued_notebook(tmp_path / "mnist.ipynb", [
        dict(key="table5_pair", verdict="fails", value="0.51", detail="",
             section=None, chapter="mnist")])
    _glued_notebook(tmp_path / "scorecard.ipynb", [     # skipped: its own page
        dict(key="table6_selection", verdict="holds", value="", detail="",
             section=None, chapter="scorecard")])
    found = scorecard.collect(tmp_path)
    assert set(found) == {"table1_linear", "table5_pair"}
    rows = {r["key"]: r for r in scorecard.rows(found)}
    assert len(rows) == len(scorecard.CLAIMS)
    assert rows["table1_linear"]["verdict"] == "holds"
    assert rows["table5_pair"]["verdict"] == "fails"
    assert rows["table6_selection"]["verdict"] == "untested-here"
    with pytest.raises(ValueError, match="CLAIMS does not list"):
        scorecard.rows({"bogus": {"verdict": "holds"}})


def test_claim_keys_are_unique():
    keys = [c.key for c in scorecard.CLAIMS]
    assert len(keys) == len(set(keys))


def test_display_path_is_never_absolute(tmp_path):
    assert fj.utils.display_path(fj.utils.repo_root() / "notebooks" / "a.ipynb") \
        == "notebooks/a.ipynb"
    assert fj.utils.display_path(tmp_path / "x" / "f.json", tmp_path) == "x/f.json"
    assert fj.utils.display_path("/elsewhere/f.json", tmp_path) == "f.json"
