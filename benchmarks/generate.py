"""Greedy generation on SmolLM2-135M (the embedded GGUF): jaxsft against transformers `generate`.

Both decode the same EntityQuestions test prompts (the SFT prompt format, left-padded to one
length) for exactly `--new` tokens (no early stop, so both do the same work), float32, warm,
median of `--iters` runs
(alternating between the implementations, so all see the same load on a shared machine). Ours runs with the layers unrolled (the default) and under `lax.scan`;
the first call's extra time is reported as compile time. Also reports how many rows' tokens agree.

    python benchmarks/generate.py [--batch_sizes 1,32] [--new 16] [--out benchmarks/results/generate.json]
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import time

import numpy as np

from common import write_json  # benchmarks/ is on sys.path when a script runs


def interleaved(fns: dict, iters: int) -> dict[str, tuple[float, float, object]]:
    """Per function: (first call's seconds, median warm seconds, last output). Warm calls alternate
    between the functions, so that all see the same background load (the machine may be shared)."""
    first, times, outs = {}, {name: [] for name in fns}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        outs[name] = fn()
        first[name] = time.perf_counter() - start
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (first[name], statistics.median(times[name]), outs[name]) for name in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_sizes", default="1,32")
    parser.add_argument("--new", type=int, default=16, help="new tokens per prompt")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "generate.json"))
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    from jaxsft import batching, config, evaluate, generate, models, tokenization
    from jaxsft.models import sources
    from jaxsft.data import entity_questions

    path = pathlib.Path(sources.locate(config.EMBEDDED_MODEL).weights)
    tokenizer = tokenization.load_tokenizer(path)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    questions = entity_questions.load(splits="test", relations="P36", limit_per_relation=max(batch_sizes))["question"]
    prompts = evaluate.prompt_ids(tokenizer, questions, config.default_config().prompt)
    never_stop = np.zeros(len(tokenizer), bool)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None  # decode exactly `--new` tokens, as ours
    ours_models = {name: models.from_pretrained(path, scan_layers=scan)
                   for name, scan in (("loop", False), ("scan", True))}

    result = dict(new_tokens=args.new, dtype="float32", torch_threads=torch.get_num_threads(), runs={})
    for batch_size in batch_sizes:
        rows = prompts[:batch_size]
        length = max(map(len, rows))
        ids, mask = batching.pad(rows, length, left=True)
        tokens = batch_size * args.new

        def hf():
            with torch.inference_mode():
                out = reference.generate(torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                                         max_new_tokens=args.new, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
            return out[:, length:].numpy()

        def ours(model):
            out = generate.generate(model, rows, stop_table=never_stop, max_new_tokens=args.new, buckets=(length,),
                                    batch_size=batch_size)
            return np.asarray([o[0] for o in out])

        timings = interleaved({"transformers": hf, **{n: functools.partial(ours, m) for n, m in ours_models.items()}},
                              args.iters)
        _, hf_seconds, hf_out = timings["transformers"]
        run = dict(prompt_length=length, transformers_tokens_per_s=tokens / hf_seconds)
        for name in ours_models:
            first, seconds, out = timings[name]
            run[name] = dict(tokens_per_s=tokens / seconds, ratio=hf_seconds / seconds, compile_s=first - seconds,
                             rows_agreeing=int((out == hf_out).all(axis=1).sum()))
        result["runs"][str(batch_size)] = run
        print(f"batch {batch_size:3d} x {args.new} new tokens (prompts {length} tokens): "
              f"transformers {run['transformers_tokens_per_s']:7.1f} tok/s; " + "; ".join(
                  f"ours {n} {run[n]['tokens_per_s']:7.1f} tok/s = {run[n]['ratio']:.2f}x "
                  f"(compile {run[n]['compile_s']:.1f} s, {run[n]['rows_agreeing']}/{batch_size} rows agree)"
                  for n in ours_models))
    result["devices"] = [str(d) for d in jax.devices()]
    result["cores"] = os.cpu_count()
    write_json(result, args.out)


if __name__ == "__main__":
    main()
