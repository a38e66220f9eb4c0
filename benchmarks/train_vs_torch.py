"""(d) One train step on 8 x 32 tokens (loss on the last half of each row), AdamW lr 1e-5, clipping
at 1.0: jaxsft's compiled step (A, logits at target positions only) against transformers +
torch.optim.AdamW (B), SmolLM2-135M, in float32 and in bfloat16 compute over float32 master weights
(torch: CPU autocast). Steps alternate A/B.

    python benchmarks/train_vs_torch.py [--pairs 5] [--dtypes float32,bfloat16] [--quick]
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common
from train_step import jax_step, make_batch, torch_step


def main() -> None:
    parser = common.arguments(__doc__)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    if args.quick:
        args.pairs = 2
    from jaxsft import models

    path = common.smollm2_gguf()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = models.save_pretrained(models.from_pretrained(path), pathlib.Path(tmp) / "hf")
        batch = make_batch(json.loads((hf_dir / "config.json").read_text())["vocab_size"])
        for dtype in args.dtypes.split(","):
            ours, theirs = jax_step(str(path), dtype, batch), torch_step(hf_dir, dtype, batch)
            losses = dict(a=ours(), b=theirs())
            results[dtype] = dict(common.alternate(ours, theirs, args.pairs), first_loss=losses)
    common.report("train_vs_torch", args, dict(batch=list(batch["input_ids"].shape), **results))


if __name__ == "__main__":
    main()
