"""Llama-3-8B, full fine-tuning on a v5p-8 (4 chips x 95 GiB HBM).

AdamW with float32 master weights and moments, bfloat16 compute, FSDP over all chips, layers scanned
and rematerialised. Its 128k vocabulary makes it 8.0B parameters: float32 state does not fit the
128 GiB of a v5e-8 or v4-8; bfloat16 params and moments do (`--config.model.param_dtype=bfloat16`),
but at the paper's learning rate (1e-5) most updates then round away: prefer v5p.
"""

from jaxsft import config


def get_config():
    c = config.default_config()
    c.model.path = "meta-llama/Meta-Llama-3-8B"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.scan_layers = True
    c.model.remat = "full"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over every chip of the slice
    c.data.relations = "all"
    return c
