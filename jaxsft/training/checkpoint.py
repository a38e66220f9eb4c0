"""Orbax checkpoints of a run: the train state (params, optimizer state, step, RNG) and the data
position, written asynchronously, the last N kept.

Restoring reads the latest checkpoint onto the shardings of the target (so onto any mesh). One that
cannot be read is moved aside to `<directory>.unreadable/` with a warning naming it, and the one
before it is tried; a directory whose checkpoints all fail is an error, never a silent fresh start.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from jaxsft.errors import UserError
from jaxsft.training.step import TrainState


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, keep: int):
        self.directory = epath.Path(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True))

    def save(self, step: int, state: TrainState, position: dict[str, Any]) -> None:
        """Start writing in the background; the arrays are copied before this returns."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(position)), force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, target: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        """The newest readable (state, position), placed as the abstract `target` says; None when
        there is no checkpoint at all."""
        unreadable = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
            except Exception as err:  # orbax/tensorstore raise many types for a damaged checkpoint
                logging.warning("checkpoint %s cannot be read (%s: %s); falling back to the one before it",
                                self.directory / str(step), type(err).__name__, err)
                unreadable.append(step)
                continue
            self._set_aside(unreadable)
            return restored.state, restored.data
        if unreadable:
            raise UserError(f"no checkpoint in {self.directory} can be read (steps {unreadable}); "
                               "refusing to start from scratch: move the directory away to do so")
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Move unreadable checkpoints out of the way, so that their steps can be saved again."""
        if not steps:
            return
        aside = self.directory.parent / f"{self.directory.name}.unreadable"
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            target = aside / str(step)
            k = 1
            while target.exists():  # the same step went bad before: keep both
                target, k = aside / f"{step}.{k}", k + 1
            (self.directory / str(step)).rename(target)
            logging.warning("moved unreadable checkpoint %s to %s", self.directory / str(step), target)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
