"""Phi-2 (2.8B), full fine-tuning on a v5e-8 (8 chips x 16 GiB HBM).

AdamW with float32 master weights and moments, bfloat16 compute, FSDP over all chips, layers scanned.
At the paper's batch (8 x 64 tokens) activations are small: no remat. Train step: 8.7 GiB per chip.
"""

from jaxsft import config


def get_config():
    return config.accelerator_config("microsoft/phi-2", remat="none")
