"""The experiment's report: `report.md` with the paper's table, the findings in words, and PNG plots.

Inputs are what the earlier stages wrote: memorization levels of the scored facts, and one
evaluation per grid cell (training level x size x seed), plus the model before fine-tuning.

Small test cells: an accuracy over fewer than `MIN_TEST_ITEMS` test items (one role and test level)
is marked `†` and left out of the macro averages, which the report recomputes from the per-level
accuracies (`macro`). Every cell is evaluated on the same test items, so every row averages the
same test levels.

Findings (`findings`) hold each difference against the seeds' spread (`compare`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxsft import score, select  # noqa: E402
from jaxsft.workdir import Workdir  # noqa: E402

LEVELS = (0, 1, 2, 3, 4)
ROLES = ("id", "ood")
MIN_TEST_ITEMS = 30  # fewer test items in a (role, test level) cell: marked, left out of the macro
MARK = "†"
MIN_SIZE_RATIO = 1.5  # "60 items suffice" is judged against a set at least this many times larger


@dataclasses.dataclass(frozen=True)
class Cell:
    """One fine-tuning run and its accuracies: `accuracy[role][test level]`, role in id/ood, over
    `count[role][test level]` test items. A cell whose level has no training facts has `items == 0`
    and no accuracies. The model before fine-tuning is the cell of level `BASELINE`."""

    level: str
    size: str
    seed: int
    items: int
    accuracy: Mapping[str, Mapping[int, float]]
    macro: Mapping[str, float]
    count: Mapping[str, Mapping[int, int]] = dataclasses.field(default_factory=dict)


BASELINE = "base"  # the level of the baseline cell: the model before fine-tuning


# -- the published figures --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Published:
    """A paper's figures for one model: training facts per memorization level, and the macro QA
    accuracy (%) per training level at one training-set size."""

    model: str
    source: str
    size: int
    train_facts: Mapping[int, int]
    macro: Mapping[str, Mapping[int, float]]  # role -> training level -> %


PUBLISHED = Published(
    model="Llama-3-8B",
    source="arXiv 2509.16596, EMNLP 2025, method following the original paper",
    size=1920,
    train_facts={0: 18456, 1: 29571, 2: 11558, 3: 8923, 4: 7436},
    macro={"id": {0: 45.47, 1: 52.69, 2: 57.53, 3: 55.15, 4: 53.93},
           "ood": {0: 46.24, 1: 50.80, 2: 53.71, 3: 51.04, 4: 50.25}},
)

# The published model by name: Llama-3-8B (the base model; not 3.1 / 3.2, not -Instruct), as a hub id
# (meta-llama/Meta-Llama-3-8B, the id configs/llama3_8b.py uses), a directory or a .gguf file named so.
_PUBLISHED_MODEL = re.compile(r"llama[-_ ]?3[-_ ]8b(?![-_ ]?(instruct|chat|it\b))", re.IGNORECASE)


def is_published_model(model: str) -> bool:
    """Whether `model` (a model path) names Llama-3-8B, the model of `PUBLISHED`."""
    return bool(_PUBLISHED_MODEL.search(os.fspath(model).rstrip("/")))


def published_table(published: Published = PUBLISHED) -> str:
    """The published figures as a markdown table (WORKSPACE.md's "Published reference" holds it)."""
    lines = ["| training level | training facts | ID macro accuracy (%) | OOD macro accuracy (%) |",
             "|---|---|---|---|"]
    for lv in LEVELS:
        lines.append(f"| {lv} | {published.train_facts[lv]} | {published.macro['id'][lv]:.2f} | "
                     f"{published.macro['ood'][lv]:.2f} |")
    return "\n".join(lines)


# -- accuracies, macro averages, estimates ------------------------------------------------------------

def small(cell: Cell, role: str, level: int) -> bool:
    """Whether the cell's (role, test level) accuracy rests on fewer than `MIN_TEST_ITEMS` items (a
    level whose count is unknown is not small)."""
    return cell.count.get(role, {}).get(level, MIN_TEST_ITEMS) < MIN_TEST_ITEMS


def macro(cell: Cell, role: str) -> float:
    """The unweighted mean of the cell's accuracies over the test levels of `role` that have at least
    `MIN_TEST_ITEMS` items; NaN where none has."""
    values = [a for lv, a in cell.accuracy.get(role, {}).items()
              if a is not None and not math.isnan(a) and not small(cell, role, int(lv))]
    return float(np.mean(values)) if values else float("nan")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A quantity over seeds: its mean and spread (population std, the ± of the table). `exact`: one
    deterministic model (the baseline), whose spread is 0 by construction."""

    values: tuple[float, ...]
    exact: bool = False

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def std(self) -> float:
        return 0.0 if self.exact else float(np.std(self.values))

    @property
    def spread_known(self) -> bool:
        return self.exact or len(self.values) >= 2

    def __str__(self) -> str:
        return _mean(list(self.values))


YES, NO, UNRESOLVED = "yes", "no", "not resolved"


def compare(a: Estimate, b: Estimate, factor: float = 1.0) -> str:
    """Whether `a` exceeds `factor` x `b`, held against the seeds' combined spread.

    The decision rule: d = mean(a) - factor * mean(b), s = std(a) + factor * std(b) (population
    std over seeds; 0 for the baseline). `YES` when d > s, `NO` when d < -s, else `UNRESOLVED`;
    also `UNRESOLVED` when a side has fewer than 2 seeds (its spread is unknown) or no value.
    """
    if not (a.spread_known and b.spread_known) or math.isnan(a.mean) or math.isnan(b.mean):
        return UNRESOLVED
    d, s = a.mean - factor * b.mean, a.std + factor * b.std
    return YES if d > s else NO if d < -s else UNRESOLVED


def _size_key(size: str) -> float:
    return float("inf") if size == "all" else float(size)


def _level_key(level: str) -> tuple[int, str]:
    return (0, level) if level.isdigit() else (1, level)


def _mean(values: Sequence[float]) -> str:
    if not values or any(np.isnan(values)):
        return "–"
    text = f"{100 * np.mean(values):.1f}"
    return text + (f" ± {100 * np.std(values):.1f}" if len(values) > 1 else "")


def _groups(cells: Sequence[Cell]) -> dict[tuple[str, str], list[Cell]]:
    """Fine-tuned cells with training facts by (training level, size), in table order."""
    groups: dict[tuple[str, str], list[Cell]] = collections.defaultdict(list)
    for c in cells:
        if c.items and c.level != BASELINE:
            groups[(c.level, c.size)].append(c)
    return dict(sorted(groups.items(), key=lambda kv: (_level_key(kv[0][0]), _size_key(kv[0][1]))))


def _macro_estimate(group: Sequence[Cell], role: str, exact: bool = False) -> Estimate:
    return Estimate(tuple(macro(c, role) for c in group), exact=exact)


def _level_estimate(group: Sequence[Cell], role: str, level: int) -> Estimate:
    values = tuple(c.accuracy.get(role, {}).get(level, float("nan")) for c in group)
    return Estimate(tuple(float("nan") if v is None else v for v in values))


# -- the paper's table ----------------------------------------------------------------------------------

def paper_table(cells: Sequence[Cell], baseline: Cell | None = None) -> str:
    """Rows: the baseline (the model before fine-tuning) first, then training level x size (mean ± std
    over seeds; items: training facts per seed); columns: accuracy per test level and the macro
    average (`macro`), in domain then out of domain. `†`: fewer than `MIN_TEST_ITEMS` test items."""
    head = ["train level", "size", "items"] + [f"{role} {col}" for role in ("ID", "OOD")
                                       for col in [f"L{lv}" for lv in LEVELS] + ["avg"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    everyone = [c for c in [baseline, *cells] if c is not None]
    counts = []
    for role in ROLES:
        for lv in LEVELS:
            known = [c.count[role][lv] for c in everyone if lv in c.count.get(role, {})]
            counts.append(str(max(known)) + (MARK if max(known) < MIN_TEST_ITEMS else "") if known else "?")
        counts.append("")
    lines.append("| test items | | | " + " | ".join(counts) + " |")

    def row(label: str, size: str, items: str, group: Sequence[Cell]) -> str:
        out = [label, size, items]
        for role in ROLES:
            for lv in LEVELS:
                values = [c.accuracy.get(role, {}).get(lv, float("nan")) for c in group]
                text = _mean([float("nan") if v is None else v for v in values])
                out.append(text + (MARK if text != "–" and any(small(c, role, lv) for c in group) else ""))
            out.append(_mean([macro(c, role) for c in group]))
        return "| " + " | ".join(out) + " |"

    if baseline is not None:
        lines.append(row("before fine-tuning", "–", "0", [baseline]))
    empty = collections.defaultdict(list)
    for c in cells:
        if not c.items and c.level != BASELINE:
            empty[(c.level, c.size)].append(c)
    rows = {**_groups(cells), **empty}
    for (level, size), group in sorted(rows.items(), key=lambda kv: (_level_key(kv[0][0]), _size_key(kv[0][1]))):
        lines.append(row(level, size, "/".join(str(c.items) for c in group), group))
    return "\n".join(lines)


# -- findings ------------------------------------------------------------------------------------------

def _pct(e: Estimate) -> str:
    return f"{e}%"


def _sixty_items(groups: Mapping[tuple[str, str], list[Cell]]) -> list[str]:
    """(a) the smallest training set against each larger one of the same level (at least
    `MIN_SIZE_RATIO` times its items): >= 90% of its macro?"""
    out = []
    by_level: dict[str, dict[str, list[Cell]]] = collections.defaultdict(dict)
    for (level, size), group in groups.items():
        by_level[level][size] = group
    for level, sizes in by_level.items():
        order = sorted(sizes, key=_size_key)
        base = order[0]
        for larger in order[1:]:
            small_items, large_items = (np.mean([c.items for c in sizes[s]]) for s in (base, larger))
            if large_items < MIN_SIZE_RATIO * small_items:
                out.append(f"training level {level}: size {larger} got {large_items:.0f} items, under "
                           f"{MIN_SIZE_RATIO}x the {small_items:.0f} of size {base} (the level has too few "
                           "facts): not compared")
                continue
            for role in ROLES:
                a, b = _macro_estimate(sizes[base], role), _macro_estimate(sizes[larger], role)
                share = f"{100 * a.mean / b.mean:.0f}%" if b.mean > 0 else "–"
                out.append(f"training level {level}, {role.upper()}: {base} items {_pct(a)} against "
                           f"{larger} items ({sizes[larger][0].items}) {_pct(b)}, {share} of it; "
                           f">= 90%: **{compare(a, b, 0.9)}**")
    return out or ["not measured: no training level has two sizes in the grid"]


def _comparable(groups: Mapping[tuple[str, str], list[Cell]], numeric: bool) -> dict[str, dict[str, list[Cell]]]:
    """size -> training level -> cells, for sizes with >= 2 training levels whose sets are full
    (as many items as the size asks; any count for `all`)."""
    by_size: dict[str, dict[str, list[Cell]]] = collections.defaultdict(dict)
    for (level, size), group in groups.items():
        if (level.isdigit() or not numeric) and (size == select.ALL or all(c.items == int(size) for c in group)):
            by_size[size][level] = group
    return {size: levels for size, levels in sorted(by_size.items(), key=lambda kv: _size_key(kv[0]))
            if len(levels) >= 2}


def _diagonal(groups: Mapping[tuple[str, str], list[Cell]]) -> list[str]:
    """(b) on test level L, does training on level L beat training on every other level?"""
    out = []
    for size, levels in _comparable(groups, numeric=True).items():
        for role in ROLES:
            for level, group in levels.items():
                lv = int(level)
                if any(small(c, role, lv) for c in group) or lv not in group[0].accuracy.get(role, {}):
                    continue
                own = _level_estimate(group, role, lv)
                others = {other: _level_estimate(g, role, lv) for other, g in levels.items() if other != level}
                verdict = (YES if all(compare(own, e) == YES for e in others.values())
                           else NO if any(compare(e, own) == YES for e in others.values()) else UNRESOLVED)
                rivals = ", ".join(f"level {o} {_pct(e)}" for o, e in others.items())
                out.append(f"{role.upper()} test level {lv}, size {size}: trained on level {lv} {_pct(own)}, "
                           f"on {rivals}; level {lv} best: **{verdict}**")
    return out or ["not measured: no size has two training levels with full sets and test levels of >= "
                   f"{MIN_TEST_ITEMS} items"]


def _best_level(groups: Mapping[tuple[str, str], list[Cell]]) -> list[str]:
    """(c) the training level with the highest macro accuracy, per size and role."""
    out = []
    for size, levels in _comparable(groups, numeric=False).items():
        for role in ROLES:
            ranked = sorted(((level, _macro_estimate(g, role)) for level, g in levels.items()),
                            key=lambda kv: -kv[1].mean if not math.isnan(kv[1].mean) else math.inf)
            (top, a), (second, b) = ranked[0], ranked[1]
            verdict = compare(a, b)
            text = (f"level {top} ({_pct(a)}), ahead of level {second} ({_pct(b)})" if verdict == YES
                    else f"not resolved: level {top} {_pct(a)}, level {second} {_pct(b)}")
            out.append(f"{role.upper()}, size {size}: {text}")
    return out or ["not measured: no size has two training levels with full sets"]


def _against_baseline(groups: Mapping[tuple[str, str], list[Cell]], baseline: Cell | None) -> list[str]:
    """(d) each fine-tuned row's macro against the model before fine-tuning."""
    if baseline is None:
        return ["not measured: the model before fine-tuning was not evaluated"]
    out = []
    words = {YES: "higher", NO: "lower", UNRESOLVED: "not resolved"}
    for role in ROLES:
        base = _macro_estimate([baseline], role, exact=True)
        parts = []
        for (level, size), group in groups.items():
            e = _macro_estimate(group, role)
            diff = 100 * (e.mean - base.mean)
            parts.append(f"level {level}/{size}: {diff:+.1f} ± {100 * e.std:.1f} ({words[compare(e, base)]})")
        out.append(f"{role.upper()} (baseline {_pct(base)}): " + "; ".join(parts))
    return out


def findings(cells: Sequence[Cell], baseline: Cell | None = None) -> str:
    """The findings in words, with their numbers (macro accuracies in %, mean ± std over seeds), each
    held against the seeds' spread by `compare`."""
    groups = _groups(cells)
    sections = [("(a) Do 60 items reach >= 90% of a larger set's accuracy (same training level, macro)?",
                 _sixty_items(groups)),
                ("(b) Does each training level help its own test level most (the diagonal)?", _diagonal(groups)),
                ("(c) Which training level is best (macro)?", _best_level(groups)),
                ("(d) What did fine-tuning do against the model before it (macro, percentage points)?",
                 _against_baseline(groups, baseline))]
    return "\n\n".join(f"{title}\n\n" + "\n".join(f"- {line}" for line in lines) for title, lines in sections)


DECISION_RULE = (
    "A difference counts (*resolved*) only when it exceeds the seeds' combined spread: for means a and b "
    "with population std s_a and s_b over seeds (the ± of the table; 0 for the baseline, one model), "
    "a > b is resolved when a − b > s_a + s_b, a < b when a − b < −(s_a + s_b); otherwise, or with fewer "
    "than 2 seeds on a fine-tuned side, it is *not resolved*. \"Reach 90%\" compares a with 0.9·b "
    "(spread s_a + 0.9·s_b). Comparisons across training levels use the sizes at which each level got "
    "its full set.")


def published_comparison(cells: Sequence[Cell], train_levels: Mapping[str, Sequence[int]],
                         published: Published = PUBLISHED) -> str:
    """The published figures beside the run's own: training facts per level, and the macro per training
    level at the published size (or, when the grid lacks it, the run's largest size, named)."""
    groups = _groups(cells)
    ours_facts = [sum(c[lv] for c in train_levels.values()) for lv in LEVELS]
    lines = ["| training level | training facts: published | ours | size (ours) | ID macro: published | ours | "
             "OOD macro: published | ours |", "|---|---|---|---|---|---|---|---|"]
    for lv in LEVELS:
        sizes = {size: g for (level, size), g in groups.items() if level == str(lv)}
        size = str(published.size) if str(published.size) in sizes else max(sizes, key=_size_key, default=None)
        ours = {role: _macro_estimate(sizes[size], role) if size else Estimate(()) for role in ROLES}
        lines.append(f"| {lv} | {published.train_facts[lv]} | {ours_facts[lv]} | {size or '–'} | "
                     f"{published.macro['id'][lv]:.2f} | {ours['id']} | {published.macro['ood'][lv]:.2f} | "
                     f"{ours['ood']} |")
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------------------

def level_counts(relations: Sequence[str], levels: Sequence[int]) -> dict[str, list[int]]:
    """Facts per memorization level, per relation."""
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0] * len(LEVELS))
    for relation, level in zip(relations, levels):
        counts[relation][int(level)] += 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0][1:])))


def _plot_levels(counts: Mapping[str, Sequence[int]], title: str):
    fig, ax = plt.subplots(figsize=(10, 4))
    relations = list(counts)
    bottom = np.zeros(len(relations))
    for lv in LEVELS:
        values = np.array([counts[r][lv] for r in relations], float)
        ax.bar(relations, values, bottom=bottom, label=f"level {lv}")
        bottom += values
    ax.set_ylabel("facts")
    ax.set_title(title)
    ax.legend(ncol=5, fontsize="small")
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    return fig


def _plot_sizes(cells: Sequence[Cell], baseline: Cell | None):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    groups = _groups(cells)
    for ax, role in zip(axes, ROLES):
        for level in sorted({lv for lv, _ in groups}, key=_level_key):
            order = sorted((s for lv, s in groups if lv == level), key=_size_key)
            estimates = [_macro_estimate(groups[(level, s)], role) for s in order]
            ax.errorbar(order, [100 * e.mean for e in estimates], yerr=[100 * e.std for e in estimates],
                        marker="o", capsize=3, label=f"train level {level}")
        if baseline is not None:
            ax.axhline(100 * macro(baseline, role), color="gray", linestyle="--", label="before fine-tuning")
        ax.set_title(f"{role.upper()} accuracy (macro over test levels with >= {MIN_TEST_ITEMS} items)")
        ax.set_xlabel("training-set size")
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize="small")
    fig.tight_layout()
    return fig


def _run_model(workdir: Workdir) -> str:
    """The model the experiment scored its training facts with (the scores' manifest), or ''."""
    scores = score.output_dir(workdir, "train")
    return scores.read_json(score.MANIFEST).get("model", {}).get("path", "") if scores.exists(score.MANIFEST) else ""


def write(workdir: str | os.PathLike | Workdir, *, train_levels: Mapping[str, Sequence[int]],
          test_levels: Mapping[str, Sequence[int]], cells: Sequence[Cell], timings: Mapping[str, float],
          header: str = "", baseline: Cell | None = None, model: str | None = None):
    """Write `report.md` and its plots into `workdir`; return the report's path. `baseline` is the
    model before fine-tuning, evaluated on the same test items. `model` (default: the model of the
    workdir's scores) decides whether the published figures (`PUBLISHED`) stand beside ours."""
    workdir = Workdir(workdir)
    model = _run_model(workdir) if model is None else model
    workdir.write_figure("levels_train.png", _plot_levels(train_levels, "Memorization levels of the training facts"))
    workdir.write_figure("levels_test.png", _plot_levels(test_levels, "Memorization levels of the test facts"))
    workdir.write_figure("accuracy_vs_size.png", _plot_sizes(cells, baseline))

    def counts_table(counts: Mapping[str, Sequence[int]]) -> str:
        rows = ["| relation | " + " | ".join(f"L{lv}" for lv in LEVELS) + " | total |", "|" + "---|" * 7]
        for relation, c in counts.items():
            rows.append(f"| {relation} | " + " | ".join(map(str, c)) + f" | {sum(c)} |")
        return "\n".join(rows)

    runs = sorted({select.set_name(c.level, c.size, c.seed) for c in cells if c.items})
    tensorboard = ", ".join(f"[{name}](sft/{name}/tensorboard)" for name in runs) or "none yet"
    timing_rows = "\n".join(f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items())
    if is_published_model(model):
        published = f"""The run's model is {PUBLISHED.model}: the published figures ({PUBLISHED.source};
{PUBLISHED.size} training items, macro over all five test levels) beside ours (macro over the test levels with
>= {MIN_TEST_ITEMS} items; training facts: the facts scored here, per level).

{published_comparison(cells, train_levels)}"""
    else:
        published = (f"Published figures exist for {PUBLISHED.model} ({PUBLISHED.source}); this run's model "
                     f"(`{model or 'unknown'}`) is another, so they are not shown beside it (WORKSPACE.md "
                     "keeps them as the reference).")
    text = f"""# jaxsft report

{header}

## QA accuracy (%) after fine-tuning, per test memorization level

{paper_table(cells, baseline)}

Mean ± std over seeds. {MARK}: fewer than {MIN_TEST_ITEMS} test items (the row `test items` counts
them); such accuracies are shown but left out of `avg`. `avg` is recomputed here from the per-level
accuracies: the unweighted mean over the test levels with >= {MIN_TEST_ITEMS} items (the evaluation's
own `macro` in `eval/metrics.json` averages every level that has items).

![accuracy against training-set size](accuracy_vs_size.png)

Training curves and these accuracies (`eval/<role>/level<L>`, `eval/<role>/macro` at the final step)
per cell in TensorBoard: `tensorboard --logdir sft` from this directory. Cells: {tensorboard}.

## Findings

{DECISION_RULE}

{findings(cells, baseline)}

## Published results

{published}

## Memorization levels per relation

Training facts (in-domain relations):

{counts_table(train_levels)}

![levels of the training facts](levels_train.png)

Test facts:

{counts_table(test_levels)}

![levels of the test facts](levels_test.png)

## Timings

| stage | seconds |
|---|---|
{timing_rows}
| total | {sum(timings.values()):.1f} |
"""
    return workdir.write_text("report.md", text)
