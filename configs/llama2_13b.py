"""Llama-2-13B (13.0B), full fine-tuning on a v5p-8 (4 chips x 95 GiB HBM).

AdamW with float32 master weights and moments, bfloat16 compute, FSDP over all chips, layers scanned
and rematerialised: 54.4 GiB per chip for the train step. On v5e-8 and v4-8 (128 GiB in all) XLA refuses
float32 state (27.1 GiB > 15.75 GiB, 54.2 GiB > 30.75 GiB per chip); bfloat16 params and moments fit
(`--config.model.param_dtype=bfloat16`: 12.3 / 24.4 GiB), but at the paper's learning rate (1e-5) most
AdamW updates are then below bfloat16's resolution and round away: prefer v5p.
"""

from jaxsft import config


def get_config():
    return config.accelerator_config("meta-llama/Llama-2-13b-hf", remat="full")
