"""Parity with transformers' PyTorch models for every family: logits, left padding, KV cache, export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_models
from jaxsft import models


@pytest.fixture(scope="module", params=list(hf_models.FAMILIES))
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    torch_model = hf_models.build(request.param, directory)
    ours = models.from_pretrained(directory)
    ids = np.random.default_rng(0).integers(1, 96, size=(2, hf_models.SEQ_LEN))
    return request.param, directory, torch_model, ours, ids


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def test_logits_match_transformers(family):
    _, _, torch_model, ours, ids = family
    expected = hf_models.torch_logits(torch_model, ids)
    got = np.asarray(_forward(ours, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32)))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_left_padding_changes_nothing(family):
    _, _, torch_model, ours, ids = family
    pad = 5
    padded = np.concatenate([np.zeros((2, pad), ids.dtype), ids], axis=1)
    mask = np.concatenate([np.zeros((2, pad), np.int32), np.ones(ids.shape, np.int32)], axis=1)
    mask[1, :pad + 3] = 0  # a second row with more padding
    padded[1, :pad + 3] = 0
    got = np.asarray(_forward(ours, jnp.asarray(padded), jnp.asarray(mask)))
    ref0 = np.asarray(_forward(ours, jnp.asarray(ids[:1]), jnp.ones((1, ids.shape[1]), jnp.int32)))
    ref1 = np.asarray(_forward(ours, jnp.asarray(ids[1:, 3:]), jnp.ones((1, ids.shape[1] - 3), jnp.int32)))
    np.testing.assert_allclose(got[0, pad:], ref0[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[1, pad + 3:], ref1[0], atol=1e-5, rtol=0)


@nnx.jit
def _step(model, ids, mask, cache):
    hidden, cache = model.hidden_states(ids, mask, cache=cache)
    return model.unembed(hidden), cache


def test_kv_cache_decoding_equals_full_forward(family):
    _, _, _, ours, ids = family
    mask = np.ones(ids.shape, np.int32)
    mask[1, :4] = 0  # left padding in the second row
    full = np.asarray(_forward(ours, jnp.asarray(ids), jnp.asarray(mask)))
    prefill = 10
    cache = ours.init_cache(batch=2, slots=ids.shape[1])
    logits, cache = _step(ours, jnp.asarray(ids[:, :prefill]), jnp.asarray(mask[:, :prefill]), cache)
    real = mask[:, :prefill].astype(bool)  # padded positions have no meaningful logits
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :prefill][real], atol=1e-5, rtol=0)
    for t in range(prefill, ids.shape[1]):
        logits, cache = _step(ours, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5, rtol=0)


def test_export_round_trip_loads_in_transformers(family, tmp_path):
    import transformers

    _, _, torch_model, ours, ids = family
    expected = hf_models.torch_logits(torch_model, ids)
    single = models.save_pretrained(ours, tmp_path / "single")
    sharded = models.save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=40_000)
    assert (sharded / "model.safetensors.index.json").exists() and not (single / "model.safetensors.index.json").exists()
    for out in (single, sharded):
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
        np.testing.assert_allclose(hf_models.torch_logits(reloaded, ids), expected, atol=1e-4, rtol=0)
    ours_again = models.from_pretrained(sharded)  # our sharded-safetensors path
    np.testing.assert_allclose(np.asarray(_forward(ours_again, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32))),
                               expected, atol=1e-4, rtol=0)


def test_scan_layers_equals_loop(family):
    name, directory, _, ours, ids = family
    scanned = models.from_pretrained(directory, scan_layers=True)
    mask = jnp.ones(ids.shape, jnp.int32)
    np.testing.assert_allclose(np.asarray(_forward(scanned, jnp.asarray(ids), mask)),
                               np.asarray(_forward(ours, jnp.asarray(ids), mask)), atol=1e-5, rtol=0)
