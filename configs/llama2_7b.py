"""Llama-2-7B (6.7B), full fine-tuning on a v5e-8 (8 chips x 16 GiB HBM).

AdamW with float32 master weights and moments, bfloat16 compute, FSDP over all chips, layers scanned
and rematerialised. Train step per chip (`python -m jaxsft.compile --config=configs/llama2_7b.py
--topology=v5e-8`): 14.0 GiB on v5e-8, 28.0 GiB on v4-8, 28.1 GiB on v5p-8; all fit.
"""

from jaxsft import config


def get_config():
    return config.accelerator_config("meta-llama/Llama-2-7b-hf", remat="full")
