"""Metrics where researchers look: TensorBoard always, Weights & Biases when `cfg.logging.wandb_project` is set.

`log_evaluation` (called by `evaluate.run`) writes a cell's accuracies per (role, level) and their
macro averages as `eval/<role>/level<L>` and `eval/<role>/macro` scalars into the cell's
`tensorboard/` directory, at the final training step, beside the trainer's `train/*` curves:
`tensorboard --logdir <workdir>/sft` shows every cell as one run.

With a W&B project, each evaluated cell becomes one W&B run (named after the cell, grouped by
experiment) holding the config, the training curves read back from the cell's TensorBoard files,
the eval scalars and two tables (accuracy per role and level; every prediction). `WANDB_MODE=offline`
keeps it on the machine (`wandb sync` uploads later).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import tensorboardX
from etils import epath

TENSORBOARD = "tensorboard"


def final_step(run_dir: str | os.PathLike) -> int:
    """The run's last optimizer step (`train_summary.json`), 0 for a model that was not trained here."""
    summary = epath.Path(run_dir) / "train_summary.json"
    return int(json.loads(summary.read_text())["steps"]) if summary.exists() else 0


def eval_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """`eval/<role>/level<L>` and `eval/<role>/macro` for every (role, level) that has items."""
    out = {}
    for role, accuracy in metrics["accuracy"].items():
        out.update({f"eval/{role}/level{lv}": float(a) for lv, a in accuracy.items() if a is not None})
        if metrics["macro"].get(role) is not None:
            out[f"eval/{role}/macro"] = float(metrics["macro"][role])
    return out


def training_curves(logdir: str | os.PathLike, prefix: str = "train/") -> dict[int, dict[str, float]]:
    """The `prefix` scalars of the TensorBoard files in `logdir`, per step (steps a resumed run purged
    are dropped, as TensorBoard does)."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(os.fspath(logdir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    steps: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        if tag.startswith(prefix):
            for event in acc.Scalars(tag):
                steps.setdefault(event.step, {})[tag] = event.value
    return dict(sorted(steps.items()))


def log_wandb(cfg: ml_collections.ConfigDict, run_dir: epath.Path, scalars: Mapping[str, float],
              metrics: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]], step: int) -> str:
    """One W&B run for the cell: config, training curves, eval scalars and tables; returns its id."""
    import wandb

    run = wandb.init(project=cfg.logging.wandb_project, name=run_dir.name, group=run_dir.parent.parent.name,
                     job_type="sft", config=cfg.to_dict(), reinit="create_new")
    try:
        logdir = run_dir / TENSORBOARD
        curves = training_curves(logdir) if logdir.exists() else {}
        last = curves.pop(step, {})  # the trainer logs step indices 0..steps-1: normally nothing here
        for s, values in curves.items():
            if s < step:  # W&B steps only increase
                run.log(values, step=s)
        accuracy = wandb.Table(columns=["role", "level", "accuracy", "count"], data=[
            [role, int(lv), a, metrics["count"][role][lv]]
            for role, by_level in metrics["accuracy"].items() for lv, a in by_level.items()])
        columns = ["id", "relation", "role", "level", "question", "answers", "prediction", "correct"]
        table = wandb.Table(columns=columns, data=[
            [" | ".join(p[c]) if c == "answers" else p[c] for c in columns] for p in predictions])
        run.log({**last, **scalars, "eval/accuracy": accuracy, "eval/predictions": table}, step=step)
        run.summary.update({k: metrics[k] for k in ("items", "correct", "tokens_per_second") if k in metrics})
        return run.id
    finally:
        run.finish()


def log_evaluation(cfg: ml_collections.ConfigDict, run_dir: str | os.PathLike, metrics: Mapping[str, Any],
                   predictions: Sequence[Mapping[str, Any]]) -> None:
    """Eval scalars to the cell's TensorBoard at its final training step, and to W&B if configured."""
    if jax.process_index() != 0:
        return
    run_dir = epath.Path(run_dir)
    step, scalars = final_step(run_dir), eval_scalars(metrics)
    # Its own file name: events files are named by the second they open in, and one would replace another.
    with tensorboardX.SummaryWriter(os.fspath(run_dir / TENSORBOARD), filename_suffix=".eval") as writer:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
    if cfg.logging.wandb_project:
        try:
            log_wandb(cfg, run_dir, scalars, metrics, predictions, step)
        except Exception as err:  # not logged in, no network: the experiment goes on, its files hold it all
            logging.error("W&B logging of %s failed (%s: %s)", run_dir, type(err).__name__, err)
