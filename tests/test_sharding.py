"""A data=2 x fsdp=2 x tensor=2 mesh of 8 fake CPU devices computes what one device computes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_models
from jaxsft import models
from jaxsft.models import sharding

# The big matrices and how each is split: (param, {dim: mesh axes}).
SHARDED = {
    "embed": {0: "tensor", 1: "fsdp"},  # [vocab, embed]
    "layers.q_proj.kernel": {1: "fsdp", 2: "tensor"},  # [layers, embed, heads]
    "layers.o_proj.kernel": {1: "tensor", 2: "fsdp"},  # [layers, heads, embed]
    "layers.up_proj.kernel": {1: "fsdp", 2: "tensor"},  # [layers, embed, mlp]
    "layers.down_proj.kernel": {1: "tensor", 2: "fsdp"},  # [layers, mlp, embed]
}


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    return sharding.make_mesh(data=2, fsdp=2, tensor=2)


@pytest.mark.parametrize("family", ["llama3.1", "phi2"])
def test_sharded_logits_equal_one_device(family, mesh, tmp_path):
    hf_models.build(family, tmp_path)
    single = models.from_pretrained(tmp_path)
    sharded = models.from_pretrained(tmp_path, mesh=mesh)
    ids = np.random.default_rng(0).integers(3, 96, size=(4, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    expected = np.asarray(_forward(single, jnp.asarray(ids), jnp.asarray(mask)))
    batch = sharding.batch_sharding(mesh)
    got = _forward(sharded, jax.device_put(ids, batch), jax.device_put(mask, batch))
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def test_params_are_sharded(mesh, tmp_path):
    hf_models.build("llama2", tmp_path)
    params = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(
        models.from_pretrained(tmp_path, mesh=mesh), nnx.Param))}
    for name, dims in SHARDED.items():
        array = params[name]
        expected = tuple(n // (mesh.shape[dims[d]] if d in dims else 1) for d, n in enumerate(array.shape))
        assert {s.data.shape for s in array.addressable_shards} == {expected}, name
        assert np.prod(expected) < array.size, name
        assert array.sharding.mesh.shape == mesh.shape
    norm = params["final_norm.scale"]  # small vectors stay replicated
    assert {s.data.shape for s in norm.addressable_shards} == {norm.shape}
