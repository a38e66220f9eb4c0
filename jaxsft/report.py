"""The experiment's report: `report.md` with the paper's table, and PNG plots.

Inputs are what the earlier stages wrote: memorization levels of the scored facts, and one
evaluation per grid cell (training level x size x seed).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxsft import select  # noqa: E402
from jaxsft.workdir import Workdir  # noqa: E402

LEVELS = (0, 1, 2, 3, 4)


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


def level_counts(relations: Sequence[str], levels: Sequence[int]) -> dict[str, list[int]]:
    """Facts per memorization level, per relation."""
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0] * len(LEVELS))
    for relation, level in zip(relations, levels):
        counts[relation][int(level)] += 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0][1:])))


def _size_key(size: str) -> float:
    return float("inf") if size == "all" else float(size)


def _mean(values: Sequence[float]) -> str:
    if not values or any(np.isnan(values)):
        return "–"
    text = f"{100 * np.mean(values):.1f}"
    return text + (f" ± {100 * np.std(values):.1f}" if len(values) > 1 else "")


def paper_table(cells: Sequence[Cell]) -> str:
    """Rows: training level x size (mean ± std over seeds; items: training facts per seed); columns:
    accuracy per test level and the macro average, in domain then out of domain."""
    groups: dict[tuple[str, str], list[Cell]] = collections.defaultdict(list)
    for c in cells:
        groups[(c.level, c.size)].append(c)
    head = ["train level", "size", "items"] + [f"{role} {col}" for role in ("ID", "OOD")
                                       for col in [f"L{lv}" for lv in LEVELS] + ["avg"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (level, size), group in sorted(groups.items(), key=lambda kv: (kv[0][0], _size_key(kv[0][1]))):
        row = [level, size, "/".join(str(c.items) for c in group)]
        for role in ("id", "ood"):
            row += [_mean([c.accuracy.get(role, {}).get(lv, float("nan")) for c in group]) for lv in LEVELS]
            row.append(_mean([c.macro.get(role, float("nan")) for c in group]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


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


def _plot_sizes(cells: Sequence[Cell]):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, role in zip(axes, ("id", "ood")):
        by_level: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for c in cells:
            if c.items:
                by_level[c.level][c.size].append(c.macro[role])
        for level, sizes in sorted(by_level.items()):
            order = sorted(sizes, key=_size_key)
            ax.plot(order, [100 * np.mean(sizes[s]) for s in order], marker="o", label=f"train level {level}")
        ax.set_title(f"{role.upper()} accuracy (macro over test levels)")
        ax.set_xlabel("training-set size")
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize="small")
    fig.tight_layout()
    return fig


def write(workdir: str | os.PathLike | Workdir, *, train_levels: Mapping[str, Sequence[int]],
          test_levels: Mapping[str, Sequence[int]], cells: Sequence[Cell], timings: Mapping[str, float],
          header: str = "", baseline: Cell | None = None):
    """Write `report.md` and its plots into `workdir`; return the report's path. `baseline` is the
    model before fine-tuning, evaluated on the same test items."""
    workdir = Workdir(workdir)
    workdir.write_figure("levels_train.png", _plot_levels(train_levels, "Memorization levels of the training facts"))
    workdir.write_figure("levels_test.png", _plot_levels(test_levels, "Memorization levels of the test facts"))
    workdir.write_figure("accuracy_vs_size.png", _plot_sizes(cells))

    def counts_table(counts: Mapping[str, Sequence[int]]) -> str:
        rows = ["| relation | " + " | ".join(f"L{lv}" for lv in LEVELS) + " | total |", "|" + "---|" * 7]
        for relation, c in counts.items():
            rows.append(f"| {relation} | " + " | ".join(map(str, c)) + f" | {sum(c)} |")
        return "\n".join(rows)

    runs = sorted({select.set_name(c.level, c.size, c.seed) for c in cells if c.items})
    tensorboard = ", ".join(f"[{name}](sft/{name}/tensorboard)" for name in runs) or "none yet"
    timing_rows = "\n".join(f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items())
    text = f"""# jaxsft report

{header}

## QA accuracy (%) after fine-tuning, per test memorization level

{paper_table(cells)}

![accuracy against training-set size](accuracy_vs_size.png)

Training curves and these accuracies (`eval/<role>/level<L>`, `eval/<role>/macro` at the final step)
per cell in TensorBoard: `tensorboard --logdir sft` from this directory. Cells: {tensorboard}.

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
