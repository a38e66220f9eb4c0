"""What every benchmark shares: the A/B harness (alternated pairs on one machine, load recorded,
void when the machine is busy), the machine's description, and writing the figures as JSON."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

RESULTS = pathlib.Path(__file__).parent / "results"
MAX_LOAD_PER_CORE = 1.0  # 1-minute load average per core above which a result is void


def write_json(result: dict[str, Any], out: str | pathlib.Path) -> pathlib.Path:
    """Write a benchmark's figures as indented JSON (making the directory) and say where."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def arguments(doc: str, pairs: int = 5, facts: int = 8) -> argparse.ArgumentParser:
    """The options every A/B script takes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=pairs, help="A/B alternations (>= 5 for a result)")
    parser.add_argument("--facts", type=int, default=facts, help="facts per workload, where it has facts")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a result")
    parser.add_argument("--out", default="", help="JSON path (default benchmarks/results/<name>.json)")
    return parser


def machine() -> dict[str, Any]:
    """Where the figures come from: CPU, cores, and the versions of everything timed."""
    import jax

    info: dict[str, Any] = dict(platform=platform.platform(), processor=platform.processor(),
                                cores=os.cpu_count(), devices=[str(d) for d in jax.devices()], jax=jax.__version__)
    for name in ("jaxlib", "flax", "torch", "transformers", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def load() -> dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return dict(load1=one, load5=five, load15=fifteen, per_core=one / (os.cpu_count() or 1))


def alternate(a: Callable[[], Any], b: Callable[[], Any], pairs: int, warmup: int = 1) -> dict[str, Any]:
    """Time A (ours) and B (the reference) alternately `pairs` times after `warmup` untimed calls of
    each (compilation, caches). Per pair, ratio = B seconds / A seconds (> 1: ours is faster); the
    median, min and max ratio. The result is void when the load per core before or after exceeds
    `MAX_LOAD_PER_CORE` (other processes were competing for the cores)."""
    for _ in range(warmup):
        a()
        b()
    before = load()
    seconds_a, seconds_b = [], []
    for _ in range(pairs):
        for fn, times in ((a, seconds_a), (b, seconds_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    after = load()
    ratios = [tb / ta for ta, tb in zip(seconds_a, seconds_b)]
    reasons = ([f"load per core {max(before['per_core'], after['per_core']):.2f} > {MAX_LOAD_PER_CORE}"]
               if max(before["per_core"], after["per_core"]) > MAX_LOAD_PER_CORE else [])
    reasons += ["fewer than 5 pairs"] if pairs < 5 else []
    return dict(pairs=pairs, seconds_a=seconds_a, seconds_b=seconds_b, median_a=statistics.median(seconds_a),
                median_b=statistics.median(seconds_b), ratio_median=statistics.median(ratios),
                ratio_min=min(ratios), ratio_max=max(ratios), load_before=before, load_after=after,
                void=bool(reasons), void_reason="; ".join(reasons))


def report(name: str, args: argparse.Namespace, result: dict[str, Any]) -> pathlib.Path:
    """Print the verdict line(s) and write benchmarks/results/<name>.json (or `--out`)."""
    result = dict(name=name, quick=args.quick, machine=machine(), **result)
    for key, value in result.items():
        if isinstance(value, dict) and "ratio_median" in value:
            print(f"{name} {key}: B/A median {value['ratio_median']:.2f}x (min {value['ratio_min']:.2f}, "
                  f"max {value['ratio_max']:.2f}) over {value['pairs']} pairs"
                  + (f"  VOID: {value['void_reason']}" if value["void"] else ""), flush=True)
    return write_json(result, args.out or RESULTS / f"{name}.json")


def smollm2_gguf() -> pathlib.Path:
    from jaxsft import config
    from jaxsft.models import sources

    return pathlib.Path(sources.locate(config.EMBEDDED_MODEL).weights)


def torch_model(path: pathlib.Path):
    """transformers' model of the same GGUF, float32, eval."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def in_domain_facts(n: int) -> list[dict]:
    """The first `n` in-domain training facts, spread over the 10 ID relations."""
    from jaxsft.data import entity_questions
    from jaxsft.data.relations import ID_RELATIONS

    per_relation = -(-n // len(ID_RELATIONS))
    facts = list(entity_questions.load(splits="train", relations=ID_RELATIONS, limit_per_relation=per_relation))
    return facts[::max(1, len(facts) // n)][:n]


def scoring_workload(doc: str, facts: int):
    """What the scoring benchmarks share: (args, scoring config, max new tokens, our model, tokenizer,
    N in-domain facts, the transformers model), SmolLM2-135M float32 on both sides."""
    args = arguments(doc, facts=facts).parse_args()
    if args.quick:
        args.facts, args.pairs = 1, 2
    from jaxsft import config as config_lib
    from jaxsft import models, tokenization

    cfg = config_lib.default_config().scoring
    path = smollm2_gguf()
    return (args, cfg, 4 if args.quick else cfg.max_new_tokens, models.from_pretrained(path, scan_layers=True),
            tokenization.load_tokenizer(path), in_domain_facts(args.facts), torch_model(path))


def hf_sampling_protocol(hf, tokenizer, facts, *, num_samples: int = 10, temperature: float = 0.7,
                         max_new_tokens: int = 32) -> list[list[float]]:
    """The paper's protocol with transformers `generate`: per fact, its 21 template prompts (the
    ids the sampling scorer uses) in one left-padded batch, `num_return_sequences` samples each at
    temperature T (no top-k / top-p), stopping at EOS or any token with a newline; hit shares."""
    import numpy as np
    import torch

    from jaxsft import batching, generate, tokenization
    from jaxsft.data import answers, templates as templates_lib
    from jaxsft.scoring import sampling

    bos, eos = tokenization.special_tokens(tokenizer)
    head = [] if bos is None else [bos]
    stop_ids = np.nonzero(generate.stop_token_table(tokenizer, [eos]))[0].tolist()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    templates = templates_lib.completion_templates()
    rates = []
    for fact in facts:
        prompts = [sampling.template_prompt(tokenizer, head, templates_lib.fill(t, fact["subject"]))
                   for t in templates[fact["relation"]]]
        ids, mask = batching.pad(prompts, max(map(len, prompts)), left=True, pad_id=pad)
        with torch.inference_mode():
            out = hf.generate(torch.from_numpy(ids.astype(np.int64)),
                              attention_mask=torch.from_numpy(mask.astype(np.int64)), do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              num_return_sequences=num_samples, max_new_tokens=max_new_tokens,
                              eos_token_id=stop_ids, pad_token_id=pad)
        rows = out[:, ids.shape[1]:].tolist()
        hits = []
        for row in rows:
            end = next((k + 1 for k, t in enumerate(row) if t in stop_ids), len(row))
            hits.append(answers.contains_answer(sampling.completion_text(tokenizer, row[:end]), fact["answers"]))
        rates.append([float(np.mean(hits[j * num_samples:(j + 1) * num_samples])) for j in range(len(prompts))])
    return rates
