"""Row-steps of the sampler with compaction against the loop before it: counts, not time (safe on a
busy machine). SmolLM2-135M float32 on

  (a) the paper's sampling protocol (`sampling.template_hit_rates`, 21 templates x 10 samples,
      T = 0.7, <= 32 tokens, stop at EOS / newline) on N in-domain facts, 21 N prompts a batch;
  (b) greedy evaluation (`evaluate.predict`, the default `eval` config: batches of 64, <= 16 tokens)
      of Q in-domain questions with the SFT prompt (the base model, not fine-tuned).

A row-step is one row fed one token (~2 x 135M FLOPs). `generate(stats=...)` counts them; from each
batch's completion lengths the script also replays the chunk schedule for other row-bucket ladders
(the schedule depends on the lengths only). `--check` runs everything again with `compact=False`
and asserts token-for-token equal outputs.

    python benchmarks/row_steps.py [--facts 3] [--questions 64] [--check]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import contextlib
from collections.abc import Sequence

import numpy as np

import common


def replay(lengths: Sequence[int], full: int, ladder: Sequence[int], last: int) -> int:
    """Row-steps of the chunk schedule from the rows' token counts: after choosing token t a row with
    n tokens still runs iff n > t + 1; a chunk ends once the running rows fit a smaller bucket."""
    size, t, steps = full, 0, 0
    while True:
        running = sum(n > t + 1 for n in lengths)
        if t == last or running == 0:
            return steps
        smaller = [b for b in ladder if b < size]
        if smaller and running <= smaller[0]:
            size = min(b for b in ladder if b >= running)
            continue
        steps, t = steps + size, t + 1


def ladders(full: int) -> dict[str, tuple[int, ...]]:
    from jaxsft import generate

    return {"default": generate.row_buckets(full), "powers of two": generate.row_buckets(full, per_octave=1),
            "every multiple of 8": tuple(range(8 * ((full - 1) // 8), 0, -8))}


@contextlib.contextmanager
def counted(compact: bool, stats: dict, calls: list):
    """Every `generate.generate` call (as the scorer and evaluation make them) with `compact` and
    `stats`; each call's (prompts, options, outputs) appended to `calls`."""
    from jaxsft import generate

    real = generate.generate

    def wrapped(model, prompts, **options):
        out = real(model, prompts, compact=compact, stats=stats, **options)
        calls.append((prompts, options, out))
        return out

    generate.generate = wrapped
    try:
        yield
    finally:
        generate.generate = real


def summary(stats: dict, calls: list) -> dict:
    from jaxsft import batching

    batches = []  # (lengths of a batch's rows, batch x samples, last step)
    for prompts, o, out in calls:
        for _, idx in batching.bucketed_batches([len(p) for p in prompts], o["buckets"], o["batch_size"]):
            batches.append(([len(row) for i in idx for row in out[i]], o["batch_size"] * o.get("num_samples", 1),
                            o["max_new_tokens"] - 1))
    lengths = np.array([n for b in batches for n in b[0]])
    full = batches[0][1]
    replays = {name: sum(replay(b, f, ladder, last) for b, f, last in batches)
               for name, ladder in ladders(full).items()}
    assert replays["default"] == stats["row_steps"], (replays, stats)
    powers = ladders(full)["default"]
    per_batch = [dict(rows=len(b), batch_rows=f, uncompacted=f * min(last, max(b)),
                      compacted=replay(b, f, powers, last), running=sum(b) - len(b)) for b, f, last in batches]
    # the same rows as if they were one full batch (no filler rows): stopped rows alone
    last = batches[0][2]
    one = dict(rows=len(lengths), uncompacted=len(lengths) * min(last, int(lengths.max())),
               **{name: replay(lengths, len(lengths), ladder, last) for name, ladder in ladders(len(lengths)).items()})
    return dict(stats=stats, batches=per_batch, as_one_full_batch=one,
                saved=1 - stats["row_steps"] / stats["uncompacted_row_steps"],
                wasted_before=1 - stats["running_row_steps"] / stats["uncompacted_row_steps"],
                wasted_now=1 - stats["running_row_steps"] / stats["row_steps"],
                length_percentiles={p: float(np.percentile(lengths, p)) for p in (10, 25, 50, 75, 90)},
                mean_length=float(lengths.mean()), other_ladders_row_steps=replays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=3)
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--check", action="store_true", help="also run uncompacted; outputs must be equal")
    parser.add_argument("--out", default=str(common.RESULTS / "row_steps.json"))
    args = parser.parse_args()

    from jaxsft import config as config_lib
    from jaxsft import evaluate, models, tokenization
    from jaxsft.scoring import sampling

    path = common.smollm2_gguf()
    model, tokenizer = models.from_pretrained(path, scan_layers=True), tokenization.load_tokenizer(path)
    cfg = config_lib.default_config()
    s = cfg.scoring
    facts = common.in_domain_facts(args.facts)
    questions = [f["question"] for f in common.in_domain_facts(args.questions)]

    def protocol():
        return sampling.template_hit_rates(
            model, tokenizer, facts, temperature=s.temperature, num_samples=s.num_samples,
            max_new_tokens=s.max_new_tokens, batch_size=21 * len(facts), buckets=tuple(s.buckets), seed=s.seed)

    def greedy():
        return evaluate.predict(model, tokenizer, questions, cfg, progress=False)

    result = dict(facts=len(facts), questions=len(questions), machine=common.machine())
    for name, run in (("protocol", protocol), ("greedy_eval", greedy)):
        runs = {}
        for compact in (True, False) if args.check else (True,):
            stats, calls = {}, []
            with counted(compact, stats, calls):
                run()
            runs[compact] = (stats, calls)
        result[name] = summary(*runs[True])
        if args.check:
            assert [c[2] for c in runs[True][1]] == [c[2] for c in runs[False][1]], f"{name}: outputs differ"
            result[name].update(identical_to_uncompacted=True, uncompacted_run_row_steps=runs[False][0]["row_steps"])
        print(name, {k: v for k, v in result[name].items() if k != "stats"}, result[name]["stats"], flush=True)
    common.write_json(result, args.out)


if __name__ == "__main__":
    main()
