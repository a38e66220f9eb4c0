"""Qwen2-7B, full fine-tuning on a v5p-8 (4 chips x 95 GiB HBM).

AdamW with float32 master weights and moments, bfloat16 compute, FSDP over all chips, layers scanned
and rematerialised. 7.6B parameters (a 152k vocabulary, untied): see WORKSPACE.md's AOT table for
v5e-8 and v4-8.
"""

from jaxsft import config


def get_config():
    c = config.default_config()
    c.model.path = "Qwen/Qwen2-7B"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.scan_layers = True
    c.model.remat = "full"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over every chip of the slice
    c.data.relations = "all"
    return c
