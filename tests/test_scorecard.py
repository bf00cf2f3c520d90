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
    # a test without power: inconclusive, and the page keeps it so
    rec = run.claim("table6_selection", "inconclusive", "0.10",
                    detail="groups span -0.6 to 0.9")
    assert rec["verdict"] == "inconclusive"
    rows = {r["key"]: r for r in scorecard.rows({"table6_selection": rec},
                                                failing={})}
    assert rows["table6_selection"]["verdict"] == "inconclusive"
    with pytest.raises(ValueError, match="inconclusive"):
        run.claim("table6_selection", "maybe")


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
    rows = {r["key"]: r for r in scorecard.rows(found, failing={})}
    assert len(rows) == len(scorecard.CLAIMS)
    assert rows["table1_linear"]["verdict"] == "holds"
    assert rows["table5_pair"]["verdict"] == "fails"
    assert rows["table6_selection"]["verdict"] == "untested-here"
    with pytest.raises(ValueError, match="CLAIMS does not list"):
        scorecard.rows({"bogus": {"verdict": "holds"}}, failing={})
    # a chapter may not type a verdict the page computes
    with pytest.raises(ValueError, match="provisional"):
        scorecard.rows({"table1_linear": {"verdict": "provisional"}}, failing={})


def test_claim_keys_are_unique():
    keys = [c.key for c in scorecard.CLAIMS]
    assert len(keys) == len(set(keys))


def test_display_path_is_never_absolute(tmp_path):
    assert fj.utils.display_path(fj.utils.repo_root() / "notebooks" / "a.ipynb") \
        == "notebooks/a.ipynb"
    assert fj.utils.display_path(tmp_path / "x" / "f.json", tmp_path) == "x/f.json"
    assert fj.utils.display_path("/elsewhere/f.json", tmp_path) == "f.json"


def _record(key, verdict):
    return {key: dict(key=key, verdict=verdict, value="", detail="",
                      section=None, chapter="demo")}


def test_a_failing_gate_makes_the_claims_resting_on_it_provisional():
    key = next(c.key for c in scorecard.CLAIMS if "scm" in c.rests_on)
    free = next(c.key for c in scorecard.CLAIMS if not c.rests_on)
    found = {**_record(key, "fails"), **_record(free, "holds")}
    gated = {r["key"]: r for r in scorecard.rows(
        found, failing={"scm": ["scm-flow"]})}
    assert gated[key]["verdict"] == "provisional"
    assert gated[key]["chapter_verdict"] == "fails"
    assert gated[key]["failing_models"] == ["scm-flow"]
    assert gated[free]["verdict"] == "holds"
    clean = {r["key"]: r for r in scorecard.rows(found, failing={})}
    assert clean[key]["verdict"] == "fails"
    # undecided claims stay untested-here, with the claim's own reason
    undecided = next(c for c in scorecard.CLAIMS if c.untested and c.rests_on)
    row = next(r for r in scorecard.rows({}, failing={"scm": ["scm-flow"]})
               if r["key"] == undecided.key)
    assert row["verdict"] == "untested-here" and row["detail"] == undecided.untested


def test_failing_models_reads_the_gates_of_every_part():
    from flowjac.models.pretrained import NAMES

    parts = {p: {"gates": {"passed": True}} for ps in NAMES.values() for p in ps}
    assert scorecard.failing_models({"parts": parts}) == {}
    parts["scm-flow"] = {"gates": {"passed": False}}
    del parts["mnist-digits"]
    failing = scorecard.failing_models({"parts": parts})
    assert failing == {"scm": ["scm-flow"], "mnist-digits": ["mnist-digits"]}


def test_counts_by_verdict_and_by_experiment():
    table = [dict(key="a", kind="stated", experiment="e1", verdict="fails"),
             dict(key="b", kind="stated", experiment="e1", verdict="fails"),
             dict(key="c", kind="stated", experiment="e1", verdict="holds"),
             dict(key="d", kind="stated", experiment="e2", verdict="holds"),
             dict(key="e", kind="stated", experiment="e3", verdict="provisional"),
             dict(key="f", kind="stated", experiment="e3", verdict="fails"),
             dict(key="g", kind="stated", experiment="e4", verdict="untested-here"),
             dict(key="h", kind="stated", experiment="e5", verdict="inconclusive"),
             dict(key="i", kind="stated", experiment="e5", verdict="untested-here"),
             dict(key="j", kind="implied", experiment="e2", verdict="fails")]
    counts = scorecard.count_by_verdict(table)
    assert counts == {"holds": 2, "fails": 4, "inconclusive": 1,
                      "provisional": 1, "untested-here": 2}
    assert scorecard.count_by_verdict(table, "implied")["fails"] == 1
    # two failing claims of one experiment count once; implied rows apart
    assert scorecard.experiment_verdicts(table) == {
        "e1": "fails", "e2": "holds", "e3": "provisional",
        "e4": "untested-here", "e5": "inconclusive"}
    assert scorecard.experiment_verdicts(table, "implied") == {"e2": "fails"}


def test_every_claim_is_well_formed():
    from flowjac.models.pretrained import NAMES

    for c in scorecard.CLAIMS:
        assert c.source in scorecard.SOURCES, c.key
        assert c.experiment in scorecard.EXPERIMENTS, c.key
        assert c.kind in scorecard.KINDS, c.key
        assert set(c.rests_on) <= set(NAMES), c.key
        assert c.quote and c.where, c.key
        if c.kind == "implied":
            # an implied claim says it is the book's reading
            assert c.tested.startswith("The book's reading, not the paper's words"), c.key
    used = {c.experiment for c in scorecard.CLAIMS}
    assert used == set(scorecard.EXPERIMENTS)


def test_quote_fragments_drop_restorations_and_split_elisions():
    assert scorecard.quote_fragments("a formal ⟨do⟩-intervention") == [
        "a formal -intervention"]
    assert scorecard.quote_fragments("one  two … three ⟨…⟩ four\n") == [
        "one two", "three four"]


def test_every_quote_is_verbatim_in_its_seed_document():
    """Each quote, whitespace-normalised, is a substring of the seed text."""
    if scorecard.seed_dir() is None:
        pytest.skip("the seed documents (shared/seeds beside the repository, "
                    "../shared/seeds from its root) are absent")
    missing = []
    for c in scorecard.CLAIMS:
        text = scorecard.seed_text(c.source)
        assert text is not None, f"{scorecard.SOURCES[c.source]} missing"
        missing += [(c.key, f) for f in scorecard.quote_fragments(c.quote)
                    if f not in text]
    assert not missing, missing
    # the check can fail: a paraphrase is not in the paper
    assert "recovers the correlation between pixels" not in scorecard.seed_text(
        scorecard.PAPER)
