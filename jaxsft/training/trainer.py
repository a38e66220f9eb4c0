"""One fine-tuning run: a training set in, a fine-tuned HF model out; resumable at any checkpoint.

A run's directory (`sft/<set>/` of the workdir, local or `gs://`) holds `checkpoints/`,
`tensorboard/`, `model/` (the export) and `train_summary.json`. Started again on the same
directory, a run continues from its latest checkpoint and ends bit-identical to one never stopped.

SIGTERM (a Spot preemption notice) saves a checkpoint and returns. In a multi-process job the
hosts agree on the step through JAX's preemption sync point (the coordination service hears of a
SIGTERM on any host and names one step, the same for all), so every process saves that step and
returns, whichever of them got the signal.

With `train.lora.rank > 0` only qwix adapters train and are checkpointed; `model/` is the base with
them merged in, `adapter/` the adapters in PEFT's format (see `training.lora`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import datasets
import jax
import ml_collections
import numpy as np
import tensorboardX
import tqdm
from flax import nnx
from jax.experimental import multihost_utils

from jaxsft import export, hardware, models, runtime, workdir as workdir_lib
from jaxsft.errors import UserError
from jaxsft.models import sharding, sources
from jaxsft.training import data, lora, optim
from jaxsft.training.checkpoint import Checkpoints
from jaxsft.training.step import abstract, compile_train_step, init_program, init_state, shardings, targets_per_row

# Dense bf16 peak FLOP/s per device for MFU. CPUs have no meaningful figure: a nominal one is used.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}
TPU_KINDS = {"v4": "v4", "v5 lite": "v5e", "v5e": "v5e", "v5p": "v5p", "v5": "v5p", "v6 lite": "v6e", "v6e": "v6e"}
CPU_PEAK_FLOPS = 1e11


@dataclasses.dataclass
class TrainResult:
    model: models.Decoder  # the fine-tuned model (as far as the run got)
    step: int  # optimizer steps done
    total_steps: int
    preempted: bool  # stopped by SIGTERM: a checkpoint was saved, the model was not exported
    history: list[dict[str, float]]  # per-step metrics of this process


def peak_flops(device: jax.Device) -> float:
    kind = device.device_kind
    if device.platform == "tpu":
        name = kind.lower().removeprefix("tpu").strip()
        for prefix in sorted(TPU_KINDS, key=len, reverse=True):
            if name.startswith(prefix):
                return hardware.CHIPS[TPU_KINDS[prefix]].peak_bf16_flops
    for name, flops in GPU_PEAK_FLOPS.items():
        if name in kind:
            return flops
    return CPU_PEAK_FLOPS


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
    """An event set by SIGTERM while inside (only the main thread can take signals). In a
    multi-process job JAX's preemption notifier owns SIGTERM, and the flag stays clear."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Metrics:
    """Per-step metrics: checked finite, with throughput and MFU added, to TensorBoard (every
    `log_every` steps), the progress bar and `history`."""

    def __init__(self, logdir: str, start: int, total: int, tokens_per_step: int, n_params: int,
                 peak: float, log_every: int):
        lead = jax.process_index() == 0  # one writer and one bar per job
        self.writer = tensorboardX.SummaryWriter(logdir, purge_step=start or None) if lead else None
        self.bar = tqdm.tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                             disable=not lead)
        self.tokens = tokens_per_step  # processed, padding included: what the devices compute
        self.flops = 6 * n_params * tokens_per_step
        self.peak, self.log_every = peak, max(1, log_every)
        self.history: list[dict[str, float]] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def record(self, step: int, metrics: dict[str, jax.Array]) -> None:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        if not all(map(math.isfinite, (m["loss"], m["grad_norm"], m["param_norm"]))):
            raise FloatingPointError(f"training diverged at step {step}: loss {m['loss']}, gradient norm "
                                     f"{m['grad_norm']}, norm of the updated params {m['param_norm']}")
        m.update(step_seconds=seconds, tokens_per_sec=self.tokens / seconds, mfu=self.flops / (seconds * self.peak))
        self.history.append(dict(step=step, **m))
        if self.writer and step % self.log_every == 0:
            for k, v in m.items():
                self.writer.add_scalar(f"train/{k}", v, step)
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['learning_rate']:.2e}",
                             tok_s=f"{m['tokens_per_sec']:.0f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.writer:
            self.writer.close()


def _check_position(saved: dict[str, Any], expected: dict[str, Any], where: object) -> None:
    keys = ("batch_size", "seed", "num_items", "data_sha256", "model_sha256")
    diff = {k: (saved.get(k), expected[k]) for k in keys if saved.get(k) != expected[k]}
    if diff:
        raise UserError(f"the checkpoint in {where} was trained on another model, data or order "
                         f"(checkpoint vs now: {diff}); use another workdir")


def _preempted(step: int, sigterm: threading.Event) -> bool:
    """Whether to save `step` and stop: at the step every process agreed on after a SIGTERM."""
    if jax.process_count() > 1:
        return multihost_utils.reached_preemption_sync_point(step)
    return sigterm.is_set()


def train(cfg: ml_collections.ConfigDict, workdir: str | workdir_lib.Workdir, train_set: datasets.Dataset, *,
          mesh: jax.sharding.Mesh | None = None, max_steps: int | None = None, base: models.Decoder | None = None,
          tokenizer=None) -> TrainResult:
    """Fine-tune `cfg.model` on `train_set` (rows with `question` and `answers`) as `cfg.train` says,
    in the run directory `workdir`.

    `base`: `cfg.model` already loaded (on `mesh`), to start from instead of loading it again
    (`jaxsft.run` loads it once for every cell); it is left as it was. With LoRA it is the frozen
    input of the step, read only; when every weight trains, its weights wait in host memory
    (`runtime.parked`) while its device copy becomes the train state, and are placed back at the
    end: the devices hold one copy of the weights, as when the trainer loads its own.
    `tokenizer`: `cfg.model`'s (default: loaded).

    `max_steps` stops this call after that many steps (a checkpoint is saved there), as a job
    with a time budget would; the next call on the same workdir goes on.
    """
    t = cfg.train
    workdir = workdir_lib.Workdir(workdir)
    workdir.write_text("config.json", cfg.to_json_best_effort(indent=2))
    mesh = mesh or runtime.make_mesh(cfg)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_size % t.grad_accum or (t.batch_size // t.grad_accum) % replicas:
        raise UserError(f"batch_size {t.batch_size} must split into grad_accum={t.grad_accum} microbatches "
                         f"that divide over data x fsdp = {replicas} devices")
    if base is None:
        model, tokenizer = runtime.load(cfg, mesh)
        return _fine_tune(cfg, workdir, train_set, model, tokenizer, mesh, max_steps)
    tokenizer = tokenizer or runtime.load_tokenizer(cfg)
    if lora.enabled(t):
        return _fine_tune(cfg, workdir, train_set, base, tokenizer, mesh, max_steps)
    with runtime.parked(base) as model:
        return _fine_tune(cfg, workdir, train_set, model, tokenizer, mesh, max_steps)


def _fine_tune(cfg: ml_collections.ConfigDict, workdir: workdir_lib.Workdir, train_set: datasets.Dataset,
               model: models.Decoder, tokenizer, mesh: jax.sharding.Mesh, max_steps: int | None) -> TrainResult:
    """The run itself, from `model`: its trained params (all, or the LoRA adapters it gets here) are
    donated to the train state; the rest is a frozen input, read only."""
    t = cfg.train
    examples = data.encode(train_set, tokenizer, cfg)
    if not len(examples):
        raise UserError("the training set is empty")
    base = sources.fingerprint(cfg.model.path)

    def position(step: int) -> dict[str, Any]:  # where the run stands, and from which model
        return dict(data.position(examples, step, t.batch_size, t.seed),
                    model_sha256=f"{base['files_sha256']}:{base['weights_sha256']}")

    if lora.enabled(t):  # train adapters only (qwix); the base model is frozen
        model = lora.apply(model, t.lora, seed=t.seed, mesh=mesh)
    graphdef, params, frozen = lora.split(model)
    del model
    total = t.epochs * data.steps_per_epoch(len(examples), t.batch_size)
    optimizer, learning_rate = optim.optimizer(t), optim.schedule(t, total)
    state_shape = jax.eval_shape(lambda p: init_state(p, jax.random.key_data(jax.random.key(0)), optimizer=optimizer),
                                 params)
    state_sharding = shardings(state_shape, mesh)
    ckpts = Checkpoints(workdir.path(workdir_lib.CHECKPOINTS), t.keep_checkpoints)
    restored = ckpts.restore(abstract(state_shape, state_sharding))
    if restored is None:
        state = init_program(optimizer, state_shape, mesh)(
            params, jax.random.key_data(jax.random.key(t.seed)))
    else:
        state, saved = restored
        _check_position(saved, position(0), ckpts.directory)
        logging.info("resuming from step %d of %d (%s)", int(state.step), total, ckpts.directory)
    del params
    step_fn = compile_train_step(graphdef, optimizer, t.grad_accum, state_shape, mesh, (t.batch_size, t.max_length),
                                 frozen, targets_per_row=targets_per_row(examples.loss_mask))  # lm_head at targets only
    frozen = jax.device_put(frozen, step_fn.input_formats[0][2])  # the layouts compiled for (packed NF4 on CPU)

    start = int(state.step)
    end = total if max_steps is None else min(total, start + max_steps)
    n_params = sum(x.size for x in jax.tree.leaves(state_shape.params))
    n_model = n_params + sum(x.size for x in jax.tree.leaves(frozen))  # the FLOPs scale with the whole model
    peak = peak_flops(mesh.devices.flat[0]) * mesh.size
    logging.info("training %d params on %d items: steps %d-%d of %d, mesh %s, MFU against %.3g FLOP/s",
                 n_params, len(examples), start, end, total, dict(mesh.shape), peak)
    metrics_log = _Metrics(str(workdir.path(workdir_lib.TENSORBOARD)), start, total, t.batch_size * t.max_length,
                           n_model, peak, t.log_every)
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    pending = None
    preempted = False
    try:
        with _sigterm_flag() as sigterm:
            for step in range(start, end):
                batch = {k: jax.make_array_from_callback(v.shape, batch_sharding, v.__getitem__)
                         for k, v in data.batch(examples, step, t.batch_size, t.seed).items()}
                lr = jax.make_array_from_callback((), replicated, lambda _, s=step: np.float32(learning_rate(s)))
                state, metrics = step_fn(state, batch, frozen, lr)
                if pending:  # read the previous step's metrics while this one runs
                    metrics_log.record(*pending)
                pending = (step, metrics)
                done = step + 1
                preempted = _preempted(done, sigterm) and done < total
                if preempted or done == end or (t.checkpoint_every and done % t.checkpoint_every == 0):
                    metrics_log.record(*pending)  # never checkpoint a state not checked finite
                    pending = None
                    ckpts.save(done, state, position(done))
                    metrics_log.restart_clock()  # the next step's time excludes the save
                if preempted:
                    logging.warning("SIGTERM: saved a checkpoint at step %d of %d, stopping", done, total)
                    break
            ckpts.wait()  # still inside: a SIGTERM now does not cut the last save short
    finally:
        metrics_log.close()
        ckpts.close()

    model = adapted = nnx.merge(graphdef, state.params, *frozen)
    if lora.enabled(t):
        model = lora.merge(adapted, t.lora)  # the plain decoder the adapters make
    done = int(state.step)
    if done == total:
        workdir.sub(workdir_lib.MODEL).publish(  # weights, tokenizer, generation config, card
            lambda local: export.save(cfg, model, local, train_set=train_set, tokenizer=tokenizer,
                                      name=workdir.root.name), "config.json")
        if lora.enabled(t):
            workdir.sub(workdir_lib.ADAPTER).publish(lambda local: lora.save_adapter(
                adapted, t.lora, local, base_model=cfg.model.path), "adapter_config.json")
        history = metrics_log.history
        workdir.write_json("train_summary.json", dict(
            steps=total, items=len(examples), params=n_params, encoding=str(examples.report),
            truncated=len(examples.report.truncated), final_loss=history[-1]["loss"] if history else None,
            tokens_per_sec=float(np.median([h["tokens_per_sec"] for h in history])) if history else None,
            peak_flops=peak, mesh=dict(mesh.shape)))
    return TrainResult(model, done, total, preempted, metrics_log.history)
