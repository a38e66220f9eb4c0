"""`python -m jaxsft.train --config=configs/demo.py --workdir=runs/demo`: one fine-tuning run.

The training set of `cfg.select` is built from the workdir's scored facts (see `jaxsft.select`) and
the run writes to `sft/level<L>-size<S>-seed<N>/` of the workdir (`run_dir`): checkpoints,
TensorBoard logs and the fine-tuned model in HF format (`model/`). Run it again to resume; SIGTERM
checkpoints and exits 0.
"""

from __future__ import annotations

import os

import ml_collections

from jaxsft import hardware, select
from jaxsft.training import TrainResult, train
from jaxsft.workdir import Workdir


def run_dir(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | Workdir) -> Workdir:
    """The directory of the grid cell `cfg.select` in the experiment `workdir`."""
    s = cfg.select
    return Workdir(workdir).cell(select.set_name(s.level, s.size, s.seed))


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | Workdir) -> TrainResult:
    return train(cfg, run_dir(cfg, workdir), select.build_training_set(cfg, workdir))


def main(argv: list[str] | None = None) -> int | None:
    """The CLI (`jaxsft.cli`); its flags are defined here, so importing this module defines none."""
    from jaxsft import cli

    def _main(a: cli.Invocation) -> None:
        hardware.maybe_initialize_distributed()
        run(a.config, a.workdir)

    return cli.main(cli.Command(_main, workdir="experiment directory (holds memorization/)"), argv)


if __name__ == "__main__":
    main()
