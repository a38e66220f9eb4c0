"""`python -m jaxsft.run --config=configs/demo.py --workdir=runs/demo`: the paper's whole experiment.

Stages, in order, each skipped when its finished output is already in the workdir (so a killed run
resumes where it stopped):

1. score the training facts (in-domain relations)  → `memorization/`
2. score the test facts (every relation)            → `test_scores/memorization/`
3. the baseline: the model before fine-tuning answers the test facts
                                                    → `baseline/eval/`
4. per grid cell (training level x size x seed): select the set, fine-tune, evaluate
                                                    → `train_sets/<set>/`, `sft/<set>/`
5. report                                           → `report.md` and PNG plots

The model and tokenizer are loaded once, when a stage first needs them, and every stage and cell
works on that copy (the trainer starts each cell from it and leaves it as it was). The programs
compiled for one cell (train step, decoding) serve every other cell of the same shapes.

The workdir is a local directory or a `gs://` bucket path (see `jaxsft.workdir`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections

from jaxsft import config as config_lib
from jaxsft import evaluate, export, report, runtime, score, select, train, training
from jaxsft import workdir as workdir_lib
from jaxsft.workdir import Workdir, barrier


def stage_config(cfg: ml_collections.ConfigDict, **sections: dict) -> ml_collections.ConfigDict:
    """A copy of `cfg` with some fields of some sections replaced."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    for section, fields in sections.items():
        out[section].update(fields)
    return out


def grid(cfg: ml_collections.ConfigDict) -> Iterator[ml_collections.ConfigDict]:
    for level, size, seed in itertools.product(cfg.grid.levels, cfg.grid.sizes, cfg.grid.seeds):
        yield stage_config(cfg, select=dict(level=str(level), size=str(size), seed=int(seed)))


class Timings:
    """Seconds per stage, kept in `<workdir>/timings.json` across resumed runs."""

    FILE = "timings.json"

    def __init__(self, workdir: Workdir):
        self.workdir = workdir
        self.seconds: dict[str, float] = workdir.read_json(self.FILE) if workdir.exists(self.FILE) else {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.workdir.write_json(self.FILE, self.seconds)


def _report_cell(level: str, size: str, seed: int, items: int, metrics: dict) -> report.Cell:
    """A report row from an evaluation's metrics (levels as ints; a level without items left out)."""
    return report.Cell(
        level=level, size=size, seed=seed, items=items,
        accuracy={role: {int(lv): a for lv, a in acc.items() if a is not None}
                  for role, acc in metrics["accuracy"].items()},
        macro={role: (m if m is not None else float("nan")) for role, m in metrics["macro"].items()},
        count={role: {int(lv): int(n) for lv, n in by_level.items()} for role, by_level in metrics["count"].items()})


def _train_and_evaluate(cell: ml_collections.ConfigDict, workdir: Workdir, train_set, timings: Timings,
                        mesh: jax.sharding.Mesh, base: Callable[[], tuple]) -> dict:
    """Fine-tune the grid cell `cell.select` from the loaded base (unless its `model/` is there
    already), evaluate it, finish its model card; its metrics. The fine-tuned weights are dropped
    on return: the devices hold one model besides the base between cells."""
    s = cell.select
    name = select.set_name(s.level, s.size, s.seed)
    run_dir = train.run_dir(cell, workdir)
    model = tokenizer = None  # trained before: evaluation reads `model/` (with its tokenizer)
    if not run_dir.exists(workdir_lib.MODEL, "config.json"):
        model, tokenizer = base()
        with timings.stage(f"train {name}"):
            result = training.train(cell, run_dir, train_set, mesh=mesh, base=model, tokenizer=tokenizer)
        if result.preempted:
            logging.warning("preempted while training %s; run again to resume", name)
            raise SystemExit(0)
        model = result.model
    with timings.stage(f"evaluate {name}"):
        metrics = evaluate.run(cell, workdir, model=model, tokenizer=tokenizer)
    export.finish(cell, run_dir.sub(workdir_lib.MODEL), workdir.train_set(name).read_json(select.MANIFEST), metrics)
    return metrics


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | Workdir):
    """Run (or resume) every stage; return the report's path."""
    config_lib.validate(cfg)
    workdir = Workdir(workdir)
    timings = Timings(workdir)
    mesh = runtime.make_mesh(cfg)

    @functools.cache
    def base():  # (model, tokenizer) of cfg.model, loaded when a stage first needs them
        return runtime.load(cfg, mesh)

    train_scoring = stage_config(cfg, scoring=dict(split="train"), data=dict(relations="id"))
    test_limit = cfg.data.test_limit_per_relation or cfg.data.limit_per_relation
    test_scoring = stage_config(cfg, scoring=dict(split=cfg.eval.split),
                                data=dict(relations="all", limit_per_relation=test_limit))
    for name, stage_cfg in (("score train facts", train_scoring), ("score test facts", test_scoring)):
        with timings.stage(name):  # finished scores are only checked to be this experiment's
            loaded = (None, None) if score.memorization_done(workdir, stage_cfg.scoring.split) else base()
            score.run(stage_cfg, workdir, *loaded, mesh=mesh)

    with timings.stage("evaluate baseline"):  # the model before any fine-tuning
        metrics = evaluate.baseline_done(cfg, workdir)
        if metrics is None:
            model, tokenizer = base()
            metrics = evaluate.baseline(cfg, workdir, model=model, tokenizer=tokenizer)
            del model
    baseline = _report_cell(report.BASELINE, "0", 0, 0, metrics)

    cells = []
    for cell in grid(cfg):
        s = cell.select
        name = select.set_name(s.level, s.size, s.seed)
        metrics = evaluate.done(cell, workdir)
        if metrics is None:
            train_set = select.build_training_set(cell, workdir)
            if not len(train_set):
                logging.warning("no training facts of level %s: cell %s is left empty", s.level, name)
                cells.append(report.Cell(s.level, s.size, s.seed, 0, {}, {}))
                continue
            metrics = _train_and_evaluate(cell, workdir, train_set, timings, mesh, base)
        manifest = workdir.train_set(name).read_json(select.MANIFEST)
        cells.append(_report_cell(s.level, s.size, s.seed, manifest["count"], metrics))

    barrier("experiment done")
    trained, tested = score.read_rows(workdir, "train"), score.read_rows(workdir, cfg.eval.split)
    header = (f"Model `{cfg.model.path}`; {trained.num_rows} training facts and {tested.num_rows} test facts "
              f"scored ({cfg.scoring.method}); written {datetime.datetime.now():%Y-%m-%d %H:%M} on "
              f"{platform.node() or 'this machine'} ({jax.devices()[0].platform}, {jax.device_count()} devices, "
              f"{os.cpu_count()} CPU cores).")
    with timings.stage("report"):
        path = report.write(
            workdir,
            train_levels=report.level_counts(trained["relation"].to_pylist(), trained["level"].to_pylist()),
            test_levels=report.level_counts(tested["relation"].to_pylist(), tested["level"].to_pylist()),
            cells=cells, timings=timings.seconds, header=header, baseline=baseline)
    logging.info("report: %s", path)
    return path


def main(argv: list[str] | None = None) -> int | None:
    """The CLI (`jaxsft.cli`): the config is validated before anything is loaded."""
    from jaxsft import cli, hardware

    def _main(a: cli.Invocation) -> None:
        hardware.maybe_initialize_distributed()
        print(run(a.config, a.workdir))

    return cli.main(cli.Command(_main), argv)


if __name__ == "__main__":
    main()
