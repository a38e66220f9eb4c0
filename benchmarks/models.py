"""SmolLM2-135M (the embedded GGUF): jaxsft against transformers + PyTorch, in one run.

Loading: wall time and peak host memory (VmHWM) of `models.from_pretrained(gguf)` and of
transformers' `from_pretrained(dir, gguf_file=..., dtype=float32)`, each in a fresh subprocess, net
of a baseline subprocess that only imports the same libraries; the goal is ours <= 1.3x the model's
float32 size. Forward: tokens/s of a jit-compiled forward (ours) and a `no_grad` forward (torch) on
32 x 32 tokens, float32 and bfloat16, warm, median of several iterations
(alternating ours and torch, so both see the same load on a shared machine).

    python benchmarks/models.py [--iters 5] [--out benchmarks/results/models.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

from common import write_json  # benchmarks/ is on sys.path when a script runs

BATCH, LENGTH = 32, 32
GOAL = 1.3  # peak load memory / float32 model size


def vm_hwm() -> int:
    """This process's peak resident memory in bytes."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def gguf_path() -> pathlib.Path:
    from jaxsft import config
    from jaxsft.models import sources

    return pathlib.Path(sources.locate(config.EMBEDDED_MODEL).weights)


def child(kind: str) -> dict:
    """One measurement in this (fresh) process: imports only, or imports and a load."""
    path = gguf_path()
    if kind.startswith("ours"):
        import jax

        import jaxsft.models.gguf  # noqa: F401 (imported by a GGUF load: part of the baseline)
        from jaxsft import models

        jax.devices()
        if kind == "ours_base":
            return dict(peak=vm_hwm())
        from flax import nnx

        start = time.perf_counter()
        model = models.from_pretrained(path)
        leaves = jax.block_until_ready(jax.tree.leaves(nnx.state(model, nnx.Param)))
        seconds, params = time.perf_counter() - start, sum(a.size for a in leaves)
    else:
        import torch
        import transformers
        import transformers.modeling_gguf_pytorch_utils  # noqa: F401 (imported by a GGUF load)

        if kind == "torch_base":
            transformers.AutoModelForCausalLM  # noqa: B018 (resolve the lazy import)
            return dict(peak=vm_hwm())
        start = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
        seconds, params = time.perf_counter() - start, sum(p.numel() for p in model.parameters())
    return dict(peak=vm_hwm(), seconds=seconds, params=int(params))


def measure(kind: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind], capture_output=True, text=True, check=False,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_loading() -> dict:
    runs = {kind: measure(kind) for kind in ("ours_base", "ours", "torch_base", "torch")}
    size = runs["ours"]["params"] * 4
    result = dict(float32_bytes=size)
    for name, base in (("ours", "ours_base"), ("transformers", "torch_base")):
        load = "ours" if name == "ours" else "torch"
        net = runs[load]["peak"] - runs[base]["peak"]
        result[name] = dict(seconds=runs[load]["seconds"], peak_bytes=runs[load]["peak"],
                            baseline_bytes=runs[base]["peak"], net_bytes=net, ratio=net / size)
    result["goal_met"] = result["ours"]["ratio"] <= GOAL
    return result


def interleaved_seconds(fns: dict, iters: int) -> dict[str, float]:
    """Median seconds per call of each function, warm; calls alternate so that every function sees
    the same background load (the machine may be shared)."""
    for fn in fns.values():
        fn(), fn()  # compile / warm up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_forward(iters: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from jaxsft import models

    path = gguf_path()
    ids = np.random.default_rng(0).integers(0, 49152, (BATCH, LENGTH)).astype(np.int32)
    x, tx = jnp.asarray(ids), torch.from_numpy(ids.astype(np.int64))
    forward = nnx.jit(lambda model, x: model(x))
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    result = dict(batch=BATCH, length=LENGTH, iters=iters, torch_threads=torch.get_num_threads())
    for name, jdtype, tdtype in (("float32", jnp.float32, torch.float32), ("bfloat16", jnp.bfloat16, torch.bfloat16)):
        model = models.from_pretrained(path, dtype=jdtype, param_dtype=jdtype)
        torch_model = reference.to(tdtype)

        def theirs():
            with torch.inference_mode():
                return torch_model(tx).logits

        seconds = interleaved_seconds(dict(ours=lambda: forward(model, x).block_until_ready(), torch=theirs), iters)
        tokens = BATCH * LENGTH
        result[name] = dict(ours_tokens_per_s=tokens / seconds["ours"], torch_tokens_per_s=tokens / seconds["torch"],
                            ratio=seconds["torch"] / seconds["ours"])
        del model
        jax.clear_caches()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "models.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    result = dict(machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count()),
                  model="SmolLM2-135M-Instruct Q4_1 GGUF, dequantised to float32",
                  loading=bench_loading(), forward=bench_forward(args.iters))
    load = result["loading"]
    print(f"model float32 size: {load['float32_bytes'] / 2**20:.0f} MiB")
    for name in ("ours", "transformers"):
        r = load[name]
        print(f"load {name:12s}: {r['seconds']:6.1f} s, peak {r['peak_bytes'] / 2**20:6.0f} MiB, "
              f"net of imports {r['net_bytes'] / 2**20:6.0f} MiB = {r['ratio']:.2f}x the float32 model")
    print(f"goal ours <= {GOAL}x: {'met' if load['goal_met'] else 'NOT met'}")
    for dtype in ("float32", "bfloat16"):
        r = result["forward"][dtype]
        print(f"forward {dtype:8s} {BATCH}x{LENGTH}: ours {r['ours_tokens_per_s']:8.0f} tok/s, "
              f"torch {r['torch_tokens_per_s']:8.0f} tok/s, ours/torch {r['ratio']:.2f}x")
    write_json(result, args.out)


if __name__ == "__main__":
    main()
