"""Llama-3-8B (8.0B), full fine-tuning on a v5p-8 (4 chips x 95 GiB HBM).

AdamW with float32 master weights and moments, bfloat16 compute, FSDP over all chips, layers scanned
and rematerialised: 32.5 GiB per chip for the train step. Its 128k vocabulary puts float32 state just
over a v5e-8 (16.2 GiB > 15.75 GiB usable per chip) and a v4-8 (32.3 GiB > 30.75 GiB); bfloat16 params
and moments fit (`--config.model.param_dtype=bfloat16`: 7.9 / 15.7 GiB), but at the paper's learning
rate (1e-5) most AdamW updates then round away: prefer v5p.
"""

from jaxsft import config


def get_config():
    return config.accelerator_config("meta-llama/Meta-Llama-3-8B", remat="full")
