"""The report on synthetic cells (no model): small test cells marked and out of the macro, the
baseline row, the findings' decision rule, the published figures."""

from __future__ import annotations

import math
import pathlib

import pytest

from jaxsft import report
from jaxsft.report import NO, UNRESOLVED, YES, Cell, Estimate, compare

# Test items per (role, level): ID and OOD levels 0 and 1 are large, level 2 is small, 3-4 empty.
COUNT = {"id": {0: 120, 1: 40, 2: 12, 3: 0, 4: 0}, "ood": {0: 200, 1: 35, 2: 5, 3: 0, 4: 0}}


def cell(level: str, size: str, seed: int, id0: float, id1: float, ood0: float = 0.5, ood1: float = 0.5,
         small: float = 0.9, items: int | None = None) -> Cell:
    accuracy = {"id": {0: id0, 1: id1, 2: small}, "ood": {0: ood0, 1: ood1, 2: small}}
    return Cell(level, size, seed, int(size) if items is None else items, accuracy,
                {role: sum(a.values()) / 3 for role, a in accuracy.items()}, COUNT)


def seeds(level: str, size: str, id0: float, id1: float, spread: float = 0.01, **kw) -> list[Cell]:
    """Three seeds around (id0, id1): population std = spread * sqrt(2/3)."""
    return [cell(level, size, s, id0 + d, id1 + d, **kw) for s, d in enumerate((-spread, 0.0, spread))]


# -- the decision rule -------------------------------------------------------------------------------

def test_compare_resolves_a_difference_only_beyond_the_combined_spread():
    a, b = Estimate((0.50, 0.52, 0.54)), Estimate((0.40, 0.41, 0.42))
    assert compare(a, b) == YES and compare(b, a) == NO
    assert compare(a, Estimate((0.49, 0.51, 0.53))) == UNRESOLVED  # 0.01 apart, spreads 0.016 + 0.016
    assert compare(a, Estimate((0.52,))) == UNRESOLVED  # one seed: its spread is unknown
    assert compare(a, Estimate((0.40,), exact=True)) == YES  # the baseline: one model, no spread
    assert compare(Estimate((0.46, 0.47)), Estimate((0.50,), exact=True), 0.9) == YES  # 0.465 - 0.45 > 0.005
    assert compare(Estimate((0.43, 0.47)), Estimate((0.50,), exact=True), 0.9) == UNRESOLVED  # |0.005| < 0.02
    assert compare(a, Estimate((math.nan, 0.4))) == UNRESOLVED


# -- table: small cells, macro, baseline ------------------------------------------------------------

def test_small_test_cells_are_marked_and_left_out_of_the_recomputed_macro():
    c = cell("0", "60", 0, 0.30, 0.20, 0.10, 0.40, small=0.90)
    assert report.small(c, "id", 2) and not report.small(c, "id", 1)
    assert report.macro(c, "id") == pytest.approx(0.25)  # (0.30 + 0.20) / 2: level 2 (12 items) left out
    assert report.macro(c, "ood") == pytest.approx(0.25)
    assert c.macro["id"] == pytest.approx(0.4667, abs=1e-3)  # the evaluation's own macro kept level 2
    unknown = Cell("0", "60", 0, 60, c.accuracy, c.macro)  # no counts: nothing is judged small
    assert report.macro(unknown, "id") == pytest.approx(0.4667, abs=1e-3)
    assert math.isnan(report.macro(Cell("1", "60", 0, 0, {}, {}), "id"))


def test_paper_table_puts_the_baseline_first_and_marks_small_cells():
    base = cell(report.BASELINE, "0", 0, 0.10, 0.05, items=0)
    table = report.paper_table([*seeds("1", "60", 0.3, 0.4), *seeds("0", "60", 0.4, 0.3),
                                Cell("4", "60", 0, 0, {}, {})], base)
    lines = table.splitlines()
    assert lines[2] == "| test items | | | 120 | 40 | 12† | 0† | 0† |  | 200 | 35 | 5† | 0† | 0† |  |"
    assert lines[3].startswith("| before fine-tuning | – | 0 | 10.0 | 5.0 | 90.0† |")
    assert lines[3].split(" | ")[8] == "7.5"  # ID avg: (10 + 5) / 2
    assert lines[4].startswith(
        "| 0 | 60 | 60/60/60 | 40.0 ± 0.8 | 30.0 ± 0.8 | 90.0 ± 0.0† | – | – | 35.0 ± 0.8 |")
    assert lines[5].startswith("| 1 | 60 | 60/60/60 |") and lines[6].startswith("| 4 | 60 | 0 | – |")


# -- findings: resolved yes, resolved no, not resolved ----------------------------------------------

def grid() -> list[Cell]:
    """Level 0: 60 items at 95% of 180 items' ID macro (spread small: resolved yes). Level 1: 60 items
    at 70% of 180 (resolved no). Diagonal: level 0 best on ID test level 0 (resolved), level 1 beats
    level 0 on test level 1 only within the spread (not resolved)."""
    return [*seeds("0", "60", 0.57, 0.38, 0.005), *seeds("0", "180", 0.60, 0.40, 0.005),
            *seeds("1", "60", 0.40, 0.39, 0.02), *seeds("1", "180", 0.57, 0.56, 0.005)]


def test_findings_sixty_items():
    lines = report._sixty_items(report._groups(grid()))
    level0 = next(line for line in lines if line.startswith("training level 0, ID"))
    level1 = next(line for line in lines if line.startswith("training level 1, ID"))
    assert "60 items 47.5 ± 0.4% against 180 items (180) 50.0 ± 0.4%, 95% of it; >= 90%: **yes**" in level0
    assert "70% of it; >= 90%: **no**" in level1
    ood = next(line for line in lines if line.startswith("training level 0, OOD"))
    assert "100% of it; >= 90%: **yes**" in ood  # OOD 0.5 everywhere, spread 0
    # Level 1 had 70 facts: its "180" set is barely larger than the 60 one, and is not compared.
    short = report._groups([*seeds("1", "60", 0.40, 0.39), *seeds("1", "180", 0.57, 0.56, items=70)])
    assert report._sixty_items(short) == ["training level 1: size 180 got 70 items, under 1.5x the 60 of size 60 "
                                          "(the level has too few facts): not compared"]


def test_findings_diagonal_and_best_level():
    groups = report._groups(grid())
    diagonal = report._diagonal(groups)
    assert ("ID test level 0, size 60: trained on level 0 57.0 ± 0.4%, on level 1 40.0 ± 1.6%; "
            "level 0 best: **yes**") in diagonal
    assert any(line.startswith("ID test level 1, size 60") and line.endswith("**not resolved**") for line in diagonal)
    assert any(line.startswith("ID test level 0, size 180") and line.endswith("**yes**") for line in diagonal)
    # At 180 level 1 beats level 0 on test level 1 (0.56 vs 0.40): resolved yes.
    assert any(line.startswith("ID test level 1, size 180") and line.endswith("**yes**") for line in diagonal)
    assert not any("test level 2" in line for line in diagonal)  # 12 and 5 items: not judged
    best = report._best_level(groups)
    assert "ID, size 60: level 0 (47.5 ± 0.4%), ahead of level 1 (39.5 ± 1.6%)" in best
    assert any(line.startswith("OOD, size 60: not resolved: level") for line in best)  # all 0.5
    # A level whose set is not full (fewer facts than the size asks) is left out of the comparison.
    short = report._groups([*grid()[:6], *seeds("1", "180", 0.57, 0.56, items=90)])
    assert "180" not in report._comparable(short, numeric=True)


def test_findings_against_the_baseline_and_the_whole_text():
    base = cell(report.BASELINE, "0", 0, 0.40, 0.38, ood0=0.52, ood1=0.52, items=0)
    lines = report._against_baseline(report._groups(grid()), base)
    assert lines[0].startswith("ID (baseline 39.0%): level 0/60: +8.5 ± 0.4 (higher);")
    assert "level 1/60: +0.5 ± 1.6 (not resolved)" in lines[0]
    assert "level 0/60: -2.0 ± 0.0 (lower)" in lines[1]  # OOD 0.5 against 0.52, no spread
    text = report.findings(grid(), base)
    assert text.count("\n- ") >= 10 and "(d) What did fine-tuning do" in text
    assert "not measured" in report.findings(grid()[:3])  # one level, one size, no baseline


# -- the published figures --------------------------------------------------------------------------

@pytest.mark.parametrize("model, expected", [
    ("meta-llama/Meta-Llama-3-8B", True), ("/models/Meta-Llama-3-8B/", True), ("llama-3-8b.Q8_0.gguf", True),
    ("gs://bucket/Llama-3-8B", True), ("meta-llama/Meta-Llama-3-8B-Instruct", False),
    ("meta-llama/Llama-3.1-8B", False), ("meta-llama/Llama-2-7b-hf", False), ("embedded:smollm2-135m", False),
    ("meta-llama/Meta-Llama-3-70B", False), ("", False)])
def test_published_model_is_recognised_by_name(model, expected):
    assert report.is_published_model(model) is expected


def test_published_figures_and_the_comparison():
    p = report.PUBLISHED
    assert p.size == 1920 and sum(p.train_facts.values()) == 18456 + 29571 + 11558 + 8923 + 7436
    assert [p.macro["id"][lv] for lv in range(5)] == [45.47, 52.69, 57.53, 55.15, 53.93]
    assert [p.macro["ood"][lv] for lv in range(5)] == [46.24, 50.80, 53.71, 51.04, 50.25]
    assert "| 2 | 11558 | 57.53 | 53.71 |" in report.published_table()
    # WORKSPACE.md's "Published reference" is this table, always shown.
    assert report.published_table() in (pathlib.Path(__file__).parents[1] / "WORKSPACE.md").read_text()
    cells = [*seeds("0", "1920", 0.5, 0.4), *seeds("0", "60", 0.3, 0.2), *seeds("2", "60", 0.3, 0.2)]
    table = report.published_comparison(cells, {"P17": [10, 5, 1, 0, 0], "P19": [3, 2, 0, 0, 0]})
    assert "| 0 | 18456 | 13 | 1920 | 45.47 | 45.0 ± 0.8 | 46.24 | 50.0 ± 0.0 |" in table
    assert "| 2 | 11558 | 1 | 60 | 57.53 | 25.0 ± 0.8 |" in table  # the grid lacks 1920: its largest size
    assert "| 4 | 7436 | 0 | – | 53.93 | – |" in table


def test_write_shows_the_published_figures_beside_a_llama3_8b_run_only(tmp_path):
    base = cell(report.BASELINE, "0", 0, 0.40, 0.38, items=0)
    kw = dict(train_levels={"P17": [10, 5, 1, 0, 0]}, test_levels={"P17": [120, 40, 12, 0, 0]}, cells=grid(),
              timings={"score": 1.0}, baseline=base)
    text = report.write(tmp_path / "llama", model="meta-llama/Meta-Llama-3-8B", **kw).read_text()
    assert "| training facts: published |" in text and "| 0 | 18456 | 10 |" in text
    assert "## Findings" in text and report.DECISION_RULE in text and "| before fine-tuning |" in text
    assert "left out of `avg`" in text and (tmp_path / "llama" / "accuracy_vs_size.png").stat().st_size > 1000
    # No model given: the one the workdir's scores name (here none: not Llama-3-8B).
    other = report.write(tmp_path / "smol", **kw).read_text()
    assert "| training facts: published |" not in other and "Published figures exist for Llama-3-8B" in other
