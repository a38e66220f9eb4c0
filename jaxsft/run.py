"""`python -m jaxsft.run --config=configs/demo.py --workdir=runs/demo`: the paper's whole experiment.

Stages, in order, each skipped when its finished output is already in the workdir (so a killed run
resumes where it stopped):

1. score the training facts (in-domain relations)  → `<workdir>/memorization/`
2. score the test facts (every relation)            → `<workdir>/test_scores/memorization/`
3. per grid cell (training level x size x seed): select the set, fine-tune, evaluate
                                                    → `<workdir>/sft/<level>-<size>-<seed>/`
4. report                                           → `<workdir>/report.md` and PNG plots
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import os
import platform
import time
from collections.abc import Iterator

import jax
import ml_collections
from etils import epath

from jaxsft import config as config_lib
from jaxsft import evaluate, export, report, runtime, score, select, train, training

TEST_SCORES = "test_scores"


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

    def __init__(self, workdir: epath.Path):
        self.path = workdir / "timings.json"
        self.seconds: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if jax.process_index() == 0:
            runtime.atomic_write_json(self.path, self.seconds)


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> epath.Path:
    """Run (or resume) every stage; return the report's path."""
    config_lib.validate(cfg)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings = Timings(workdir)
    train_scoring = stage_config(cfg, scoring=dict(split="train"), data=dict(relations="id"))
    test_limit = cfg.data.test_limit_per_relation or cfg.data.limit_per_relation
    test_scoring = stage_config(cfg, scoring=dict(split=cfg.eval.split),
                                data=dict(relations="all", limit_per_relation=test_limit))
    for name, stage_cfg, where in (("score train facts", train_scoring, workdir),
                                   ("score test facts", test_scoring, workdir / TEST_SCORES)):
        if not score.memorization_done(where):
            with timings.stage(name):
                score.run(stage_cfg, where)

    cells = []
    for cell in grid(cfg):
        s = cell.select
        name = select.set_name(s.level, s.size, s.seed)
        run_dir = train.run_dir(cell, workdir)
        metrics_file = run_dir / "eval" / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
        if metrics is None:
            train_set = select.build_training_set(cell, workdir)
            if not len(train_set):
                logging.warning("no training facts of level %s: cell %s is left empty", s.level, name)
                cells.append(report.Cell(s.level, s.size, s.seed, 0, {}, {}))
                continue
            model = None
            if not (run_dir / "model" / "config.json").exists():
                with timings.stage(f"train {name}"):
                    result = training.train(cell, run_dir, train_set)
                if result.preempted:
                    logging.warning("preempted while training %s; run again to resume", name)
                    raise SystemExit(0)
                model = result.model
            with timings.stage(f"evaluate {name}"):
                metrics = evaluate.run(cell, run_dir, scores_workdir=workdir / TEST_SCORES, model=model)
            export.finish(cell, run_dir / "model", workdir / "train_sets" / name / "manifest.json", metrics)
        manifest = json.loads((workdir / "train_sets" / name / "manifest.json").read_text())
        cells.append(report.Cell(
            level=s.level, size=s.size, seed=s.seed, items=manifest["count"],
            accuracy={role: {int(lv): a for lv, a in acc.items() if a is not None}
                      for role, acc in metrics["accuracy"].items()},
            macro={role: (m if m is not None else float("nan")) for role, m in metrics["macro"].items()}))

    runtime.barrier("experiment done")
    trained, tested = score.read_rows(workdir), score.read_rows(workdir / TEST_SCORES)
    header = (f"Model `{cfg.model.path}`; {trained.num_rows} training facts and {tested.num_rows} test facts "
              f"scored ({cfg.scoring.method}); written {datetime.datetime.now():%Y-%m-%d %H:%M} on "
              f"{platform.node() or 'this machine'} ({jax.devices()[0].platform}, {jax.device_count()} devices, "
              f"{os.cpu_count()} CPU cores).")
    path = workdir / "report.md"
    if jax.process_index() == 0:
        with timings.stage("report"):
            path = report.write(
                workdir,
                train_levels=report.level_counts(trained["relation"].to_pylist(), trained["level"].to_pylist()),
                test_levels=report.level_counts(tested["relation"].to_pylist(), tested["level"].to_pylist()),
                cells=cells, timings=timings.seconds, header=header)
    logging.info("report: %s", path)
    return path


def main() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from jaxsft import hardware

    config = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "experiment directory (local or gs://)")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(argv):
        del argv
        config_lib.validate(config.value)  # before anything is loaded
        hardware.maybe_initialize_distributed()
        print(run(config.value, workdir.value))

    app.run(_main)


if __name__ == "__main__":
    main()
