"""Qwen2-7B (7.6B), full fine-tuning on a v5p-8 (4 chips x 95 GiB HBM).

AdamW with float32 master weights and moments, bfloat16 compute, FSDP over all chips, layers scanned
and rematerialised: 30.8 GiB per chip for the train step. It also compiles for v5e-8 (15.3 GiB of the
15.75 GiB XLA may use per chip) and v4-8 (30.5 of 30.75 GiB), with under 0.5 GiB to spare.
"""

from jaxsft import config


def get_config():
    return config.accelerator_config("Qwen/Qwen2-7B", remat="full")
