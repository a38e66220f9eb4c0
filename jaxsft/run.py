"""`python -m jaxsft.run --config=configs/demo.py --workdir=runs/demo`: the paper's whole experiment.

Stages, in order, each skipped when its finished output is already in the workdir (so a killed run
resumes where it stopped):

1. score the training facts (in-domain relations)  → `memorization/`
2. score the test facts (every relation)            → `test_scores/memorization/`
3. per grid cell (training level x size x seed): select the set, fine-tune, evaluate
                                                    → `train_sets/<set>/`, `sft/<set>/`
4. report                                           → `report.md` and PNG plots

The workdir is a local directory or a `gs://` bucket path (see `jaxsft.workdir`).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import platform
import time
from collections.abc import Iterator

import jax
import ml_collections

from jaxsft import config as config_lib
from jaxsft import evaluate, export, report, score, select, train, training
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


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | Workdir):
    """Run (or resume) every stage; return the report's path."""
    config_lib.validate(cfg)
    workdir = Workdir(workdir)
    timings = Timings(workdir)
    train_scoring = stage_config(cfg, scoring=dict(split="train"), data=dict(relations="id"))
    test_limit = cfg.data.test_limit_per_relation or cfg.data.limit_per_relation
    test_scoring = stage_config(cfg, scoring=dict(split=cfg.eval.split),
                                data=dict(relations="all", limit_per_relation=test_limit))
    for name, stage_cfg in (("score train facts", train_scoring), ("score test facts", test_scoring)):
        with timings.stage(name):  # finished scores are only checked to be this experiment's
            score.run(stage_cfg, workdir)

    cells = []
    for cell in grid(cfg):
        s = cell.select
        name = select.set_name(s.level, s.size, s.seed)
        run_dir = train.run_dir(cell, workdir)
        metrics = evaluate.done(cell, workdir)
        if metrics is None:
            train_set = select.build_training_set(cell, workdir)
            if not len(train_set):
                logging.warning("no training facts of level %s: cell %s is left empty", s.level, name)
                cells.append(report.Cell(s.level, s.size, s.seed, 0, {}, {}))
                continue
            model = None
            if not run_dir.exists(workdir_lib.MODEL, "config.json"):
                with timings.stage(f"train {name}"):
                    result = training.train(cell, run_dir, train_set)
                if result.preempted:
                    logging.warning("preempted while training %s; run again to resume", name)
                    raise SystemExit(0)
                model = result.model
            with timings.stage(f"evaluate {name}"):
                metrics = evaluate.run(cell, workdir, model=model)
            export.finish(cell, run_dir.sub(workdir_lib.MODEL), workdir.train_set(name).read_json(select.MANIFEST),
                          metrics)
        manifest = workdir.train_set(name).read_json(select.MANIFEST)
        cells.append(report.Cell(
            level=s.level, size=s.size, seed=s.seed, items=manifest["count"],
            accuracy={role: {int(lv): a for lv, a in acc.items() if a is not None}
                      for role, acc in metrics["accuracy"].items()},
            macro={role: (m if m is not None else float("nan")) for role, m in metrics["macro"].items()}))

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
            cells=cells, timings=timings.seconds, header=header)
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
