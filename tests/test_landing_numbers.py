"""The landing page's thesis section (book/index.md, ``sec_thesis``) quotes the
chapters' numbers: every number it states must be one that the golden notebook
of the chapter its sentence cites prints (in an output or a glued value), as
printed, so that a re-run which changes a number cannot leave a stale one on
the landing page."""
import json
import re

import pytest

from flowjac.utils import repo_root

ROOT = repo_root()

_REF = re.compile(r"\{ref\}`(?:[^`<]*<)?(sec_[A-Za-z0-9_]+)>?`")
# a number: digits with optional thousands separators and decimals, not part
# of a word (the 4 of "RK4", the 2 of "2D") nor of a longer number
_NUMBER = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w]|[.,]\d)"
                     r"|(?<![\w.,])\d+(?:\.\d+)?(?![\w]|[.,]\d)")
# names rather than quantities: "Table 5", "Figure 3"
_NAME = re.compile(r"(?:Table|Figure|Fig\.|Section|Chapter|Exercise)\s+$")
# "4 of 4": a count out of a total is checked as a phrase, since its single
# digits alone would be found almost anywhere
_OF = re.compile(r"(?<![\w.,])(\d+) of (\d+)(?![\w.,]\d)")


def chapter_of_labels() -> dict[str, str]:
    """Every ``(sec_...)=`` label in book/*.md, mapped to its chapter's stem."""
    labels = {}
    for md in sorted((ROOT / "book").glob("*.md")):
        for label in re.findall(r"^\((sec_[A-Za-z0-9_]+)\)=\s*$", md.read_text(), re.M):
            labels[label] = md.stem
    return labels


def printed(chapter: str) -> str:
    """All text a golden notebook shows: streams, text outputs and glued values."""
    nb = json.loads((ROOT / "notebooks" / f"{chapter}.ipynb").read_text())
    text = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            text.append("".join(out.get("text", "")))
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/") or mime.startswith("application/papermill.record/text/"):
                    text.append(value if isinstance(value, str) else "".join(value))
    return "\n".join(text)


def thesis_section(index_md: str) -> str:
    """The text under ``(sec_thesis)=`` up to the next level-2 heading."""
    assert "(sec_thesis)=" in index_md, "book/index.md has no (sec_thesis)= label"
    body = index_md.split("(sec_thesis)=", 1)[1]
    heading, rest = body.lstrip("\n").split("\n", 1)
    assert heading.startswith("## "), heading
    return re.split(r"^## ", rest, maxsplit=1, flags=re.M)[0]


def sentences(section: str) -> list[str]:
    """The section's sentences, one line each; a list item is split on its own."""
    blocks = re.split(r"\n\s*\n|\n(?=\* )", section)
    out = []
    for block in blocks:
        flat = " ".join(line.strip() for line in block.strip().splitlines())
        flat = re.sub(r"^\* ", "", flat)
        out += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z*{$])", flat) if s.strip()]
    return out


def stated_numbers(sentence: str) -> list[str]:
    """The numbers a sentence states, as written (cross-references and names left out)."""
    text = _REF.sub(" ", sentence)
    found = [f"{m.group(1)} of {m.group(2)}" for m in _OF.finditer(text)]
    text = _OF.sub(" ", text)
    for m in _NUMBER.finditer(text):
        if not _NAME.search(text[:m.start()]):
            found.append(m.group(0))
    return found


def is_printed(number: str, text: str) -> bool:
    """Whether ``number`` occurs in ``text`` as a whole number (0.21 is not in 0.212;
    a unit may follow it: 11.9 is in 11.9x)."""
    pattern = r"(?<![\w.,])" + re.escape(number) + r"(?![\d_]|[.,]\d|[eE][-+]?\d)"
    return re.search(pattern, text) is not None


def unprinted_numbers(index_md: str) -> tuple[list[str], int]:
    """One message per number of the thesis section that its cited chapter does not print."""
    labels = chapter_of_labels()
    problems, checked, cache = [], 0, {}
    for sentence in sentences(thesis_section(index_md)):
        numbers = stated_numbers(sentence)
        if not numbers:
            continue
        cited = _REF.findall(sentence)
        if not cited:
            problems.append(f"numbers {numbers} are stated without a {{ref}} to the "
                            f"section that computes them, in the sentence: {sentence!r}")
            continue
        chapters = []
        for label in cited:
            if label not in labels:
                problems.append(f"label {label!r} is defined in no book/*.md, "
                                f"in the sentence: {sentence!r}")
            elif not (ROOT / "notebooks" / f"{labels[label]}.ipynb").exists():
                problems.append(f"chapter {labels[label]!r} (of {label!r}) has no golden "
                                f"notebook, in the sentence: {sentence!r}")
            elif labels[label] not in chapters:
                chapters.append(labels[label])
        if not chapters:
            continue
        for ch in chapters:
            if ch not in cache:
                cache[ch] = printed(ch)
        texts = [cache[ch] for ch in chapters]
        for number in numbers:
            checked += 1
            if not any(is_printed(number, t) for t in texts):
                problems.append(
                    f"{number!r} is not printed by chapter "
                    f"{' or '.join(f'{ch!r} (notebooks/{ch}.ipynb)' for ch in chapters)}, "
                    f"which the sentence cites ({', '.join(cited)}): {sentence!r}")
    return problems, checked


def test_every_thesis_number_is_printed_by_its_cited_chapter():
    problems, checked = unprinted_numbers((ROOT / "book" / "index.md").read_text())
    assert not problems, ("book/index.md, section sec_thesis: a number is typed, not "
                          "the one its chapter computes (re-run? quote the chapter's "
                          "printed value):\n" + "\n".join(problems))
    assert checked >= 15, f"only {checked} numbers found in sec_thesis; is the parser broken?"


def test_the_parser_finds_the_numbers_and_skips_names():
    s = ("MNIST fives, the pixel pair of Table 5 ({ref}`sec_mnist_table5`): 0.825 "
         "and 39 times; at 4 of 4 budgets, $s = 0.5$, 2 against 4 RK4 steps on a 2D "
         "flow, 60,000 samples.")
    assert stated_numbers(s) == ["4 of 4", "0.825", "39", "0.5", "2", "4", "60,000"]
    assert is_printed("0.21", "up to 0.212 bpd") is False
    assert is_printed("0.21", "up to 0.21 bpd.") is True
    assert is_printed("3.3", "4.3, 13.3") is False
    assert is_printed("11.9", "E[JJ^T] is 11.9x as far") is True
    assert is_printed("1.2", "1.2e-03") is False


# the new values must appear nowhere in the cited chapter's outputs (0.817 now does: a gate
# along training in the size study)
@pytest.mark.parametrize("old, new", [("0.816", "0.811"), ("11.9 times", "12.9 times")])
def test_a_stale_number_is_caught_with_its_chapter_and_sentence(old, new):
    index_md = (ROOT / "book" / "index.md").read_text()
    section = thesis_section(index_md)
    assert old in section
    stale = index_md.replace(section, section.replace(old, new, 1))
    before, _ = unprinted_numbers(index_md)
    problems = [p for p in unprinted_numbers(stale)[0] if p not in before]
    assert len(problems) == 1, problems
    number = new.split()[0]
    assert problems[0].startswith(f"{number!r} is not printed by chapter "), problems[0]
    assert ("'mnist'" if old == "0.816" else "'byom'") in problems[0]
    assert new in problems[0]          # the sentence is quoted
