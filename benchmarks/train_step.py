"""Train-step throughput on SmolLM2-135M: jaxsft (JAX/XLA) against transformers + PyTorch, one run.

Both train the same weights (the embedded GGUF, exported to an HF directory that torch loads) on
the same batch of 8 x 32 tokens, loss on the last half of each row, with AdamW (lr 1e-5,
gradient clipping at 1.0): in float32, and in bfloat16 compute with float32 master weights
(torch: CPU autocast). The two alternate step by step (the machine may be shared); prints the
median tokens/s of each and their ratio, and writes them as JSON.

    python benchmarks/train_step.py [--steps 5] [--out benchmarks/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.models import sources
from jaxsft import config as config_lib
from jaxsft import models, runtime
from jaxsft.models import sharding
from jaxsft.training import optim
from jaxsft.training.step import TrainState, compile_train_step, shardings, targets_per_row

from common import write_json  # benchmarks/ is on sys.path when a script runs

BATCH, LENGTH = 8, 32


def make_batch(vocab: int, batch: int = BATCH, length: int = LENGTH) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, vocab, (batch, length)).astype(np.int32)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, length // 2:] = 1
    return dict(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=loss_mask)


def jax_step(path: str, dtype: str, batch: dict[str, np.ndarray]) -> Callable[[], float]:
    """jaxsft's compiled train step on one device; each call runs one step and returns its loss."""
    cfg = config_lib.default_config()
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = models.from_pretrained(path, dtype=runtime.dtype(dtype), param_dtype=jnp.float32, mesh=mesh)
    graphdef, params = nnx.split(model)
    tx = optim.optimizer(cfg.train)
    init = lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), jax.random.key_data(jax.random.key(0)))
    state_shape = jax.eval_shape(init, params)
    state = [jax.jit(init, out_shardings=shardings(state_shape, mesh))(params)]
    step_fn = compile_train_step(graphdef, tx, 1, state_shape, mesh, batch["input_ids"].shape,
                                 targets_per_row=targets_per_row(batch["loss_mask"]))
    device_batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
    lr = jax.device_put(np.float32(cfg.train.learning_rate), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def step() -> float:
        state[0], metrics = step_fn(state[0], device_batch, (), lr)
        return float(metrics["loss"])  # waits for the step

    step.flops = flops(step_fn)
    return step


def flops(compiled) -> float:
    """XLA's count of a compiled program's floating-point operations."""
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def torch_step(hf_dir: pathlib.Path, dtype: str, batch: dict[str, np.ndarray],
               device: str = "cpu") -> Callable[[], float]:
    """transformers' model with torch.optim.AdamW on `device`, bfloat16 by autocast."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.tensor(batch["input_ids"], dtype=torch.long, device=device)
    mask = torch.tensor(batch["attention_mask"], dtype=torch.long, device=device)
    labels = torch.where(torch.tensor(batch["loss_mask"], device=device) > 0, ids, -100)

    def step() -> float:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def race(steps: dict[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, dict]:
    """Alternate the contenders step by step, so load from other processes hits both alike; the
    median step time of each."""
    first = {name: [step() for _ in range(warmup)][0] for name, step in steps.items()}
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: dict(seconds_per_step=float(np.median(t)), tokens_per_sec=BATCH * LENGTH / float(np.median(t)),
                       step_seconds=t, first_loss=first[name]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=config_lib.EMBEDDED_MODEL)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default="benchmarks/train_step.json")
    args = parser.parse_args()

    path = sources.locate(args.model).weights
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = models.save_pretrained(models.from_pretrained(path), pathlib.Path(tmp) / "hf")
        vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
        batch = make_batch(vocab)
        results = {}
        for dtype in args.dtypes.split(","):
            start = time.perf_counter()
            contenders = dict(jaxsft=jax_step(path, dtype, batch))
            setup = time.perf_counter() - start  # loading, and compiling the step
            contenders["torch"] = torch_step(hf_dir, dtype, batch)
            r = race(contenders, args.warmup, args.steps)
            r["jaxsft"]["setup_seconds"] = setup
            r["ratio"] = r["jaxsft"]["tokens_per_sec"] / r["torch"]["tokens_per_sec"]
            results[dtype] = r
            print(f"{dtype:>8}: jaxsft {r['jaxsft']['tokens_per_sec']:7.1f} tok/s | torch "
                  f"{r['torch']['tokens_per_sec']:7.1f} tok/s | ratio {r['ratio']:.2f}x | first loss "
                  f"{r['jaxsft']['first_loss']:.4f} vs {r['torch']['first_loss']:.4f}", flush=True)
    report = dict(model=args.model, batch=BATCH, length=LENGTH, steps=args.steps, warmup=args.warmup,
                  device=jax.devices()[0].device_kind, platform=platform.platform(), jax=jax.__version__,
                  results=results)
    write_json(report, args.out)


if __name__ == "__main__":
    main()
