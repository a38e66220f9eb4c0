"""(e) Greedy decoding of 32 EntityQuestions test prompts (the SFT prompt format, left-padded to one
length) for exactly 16 new tokens (no early stop, the same work on both sides): jaxsft's
`generate` (A) against transformers `generate` (B), SmolLM2-135M float32. Records how many rows
agree token for token.

    python benchmarks/greedy_vs_generate.py [--pairs 5] [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

import common

BATCH, NEW = 32, 16


def main() -> None:
    args = common.arguments(__doc__).parse_args()
    batch, new = (4, 4) if args.quick else (BATCH, NEW)
    if args.quick:
        args.pairs = 2
    import torch

    from jaxsft import batching, config, evaluate, generate, models, tokenization
    from jaxsft.data import entity_questions

    path = common.smollm2_gguf()
    tokenizer = tokenization.load_tokenizer(path)
    questions = entity_questions.load(splits="test", relations="P36", limit_per_relation=batch)["question"]
    rows = evaluate.prompt_ids(tokenizer, questions, config.default_config().prompt)[:batch]
    length = max(map(len, rows))
    ids, mask = batching.pad(rows, length, left=True)
    model = models.from_pretrained(path, scan_layers=True)
    hf = common.torch_model(path)
    hf.generation_config.eos_token_id = None  # exactly `new` tokens, as ours
    never_stop = np.zeros(len(tokenizer), bool)
    outputs = {}

    def ours():
        out = generate.generate(model, rows, stop_table=never_stop, max_new_tokens=new, buckets=(length,),
                                batch_size=batch)
        outputs["a"] = np.asarray([o[0] for o in out])

    def theirs():
        with torch.inference_mode():
            out = hf.generate(torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                              max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outputs["b"] = out[:, length:].numpy()

    timing = common.alternate(ours, theirs, args.pairs)
    common.report("greedy_vs_generate", args, dict(
        batch=batch, new_tokens=new, prompt_length=length, timing=timing,
        tokens_per_s=dict(a=batch * new / timing["median_a"], b=batch * new / timing["median_b"]),
        rows_agreeing=int((outputs["a"] == outputs["b"]).all(axis=1).sum())))


if __name__ == "__main__":
    main()
