"""(a) Likelihood scoring: jaxsft's scorer (A) against a plain PyTorch loop (B) over the same
(prompt, continuation) pairs of N in-domain facts, SmolLM2-135M float32 (the embedded GGUF).

A scores the pairs as `score` does: by default in the packed layout (each prompt with all its
continuations in one row, exact); `--layout cached` for the prompt pass once per prompt, then the
continuation pass on the cached prompt, with certified pruning at `scoring.prune_epsilon`. B runs each pair's full
sequence through transformers, length-sorted batches, logits at the scored positions only. Both
give log P_T(continuation | prompt); the largest difference on the unpruned pairs is recorded.

    python benchmarks/likelihood_vs_torch.py [--facts 20] [--pairs 5] [--layout packed|cached] [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

import common
from scoring import torch_logprobs  # the plain loop of the agreement benchmark


def main() -> None:
    parser = common.arguments(__doc__, facts=20)
    parser.add_argument("--layout", default="", help="packed | cached (default: the config's, resolved)")
    args = parser.parse_args()
    if args.quick:
        args.facts, args.pairs = 2, 2
    from jaxsft import config as config_lib
    from jaxsft import models, tokenization
    from jaxsft.data import templates as templates_lib
    from jaxsft import scoring
    from jaxsft.scoring import likelihood

    cfg = config_lib.default_config().scoring
    path = common.smollm2_gguf()
    model = models.from_pretrained(path, scan_layers=True)
    tokenizer = tokenization.load_tokenizer(path)
    facts = common.in_domain_facts(args.facts)
    _, pairs = likelihood.fact_pairs(tokenizer, facts, templates_lib.completion_templates())
    hf = common.torch_model(path)
    options = dict(temperature=cfg.temperature, batch_size=cfg.batch_size, buckets=tuple(cfg.buckets),
                   prune_epsilon=cfg.prune_epsilon, layout=args.layout or scoring.layout(cfg))
    stats: dict = {}
    outputs = {}

    def ours():
        outputs["a"] = likelihood.continuation_logprobs(model, pairs, stats=stats, **options)

    def theirs():
        outputs["b"] = torch_logprobs(hf, pairs, cfg.temperature, 2 * cfg.batch_size)

    timing = common.alternate(ours, theirs, args.pairs)
    kept = np.isfinite(outputs["a"])
    common.report("likelihood_vs_torch", args, dict(
        facts=len(facts), pairs_scored=len(pairs), scorer=options, work=stats, timing=timing,
        seconds_per_fact=dict(a=timing["median_a"] / len(facts), b=timing["median_b"] / len(facts)),
        max_abs_logp_diff=float(np.max(np.abs(outputs["a"][kept] - outputs["b"][kept])))))


if __name__ == "__main__":
    main()
