"""(b) The paper's sampling protocol (21 templates x 10 samples, T = 0.7, at most 32 tokens, stop at
EOS / newline) on N in-domain facts: jaxsft's sampling scorer (A) against transformers `generate`
(B: per fact one batch of the 21 prompts, `num_return_sequences=10`, `do_sample`), SmolLM2-135M
float32. Both draw their own random samples: the mean hit shares are recorded, not compared.

Ours runs whole facts per batch (3 facts = 63 prompts, near `scoring.batch_size` = 64), so that no
batch is padded with filler prompts: use a multiple of 3 facts.

    python benchmarks/sampling_vs_generate.py [--facts 6] [--pairs 5] [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

import common


def main() -> None:
    from jaxsft.scoring import sampling

    args, cfg, max_new, model, tokenizer, facts, hf = common.scoring_workload(__doc__, facts=6)
    batch_size = 21 * max(1, min(cfg.batch_size // 21, len(facts)))  # whole facts: 21 templates each
    outputs = {}

    def ours():
        outputs["a"] = sampling.template_hit_rates(
            model, tokenizer, facts, temperature=cfg.temperature, num_samples=cfg.num_samples,
            max_new_tokens=max_new, batch_size=batch_size, buckets=tuple(cfg.buckets), seed=cfg.seed)

    def theirs():
        outputs["b"] = common.hf_sampling_protocol(hf, tokenizer, facts, num_samples=cfg.num_samples,
                                                   temperature=cfg.temperature, max_new_tokens=max_new)

    timing = common.alternate(ours, theirs, args.pairs)
    common.report("sampling_vs_generate", args, dict(
        facts=len(facts), batch_size=batch_size, num_samples=cfg.num_samples, max_new_tokens=max_new,
        temperature=cfg.temperature,
        timing=timing, seconds_per_fact=dict(a=timing["median_a"] / len(facts), b=timing["median_b"] / len(facts)),
        mean_hit_share=dict(a=float(np.mean(outputs["a"])), b=float(np.mean(outputs["b"])))))


if __name__ == "__main__":
    main()
