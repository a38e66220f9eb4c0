"""The sampler's token choice: filters are static (no sort when off), and the kept tokens are the
top-k / nucleus sets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft import generate


def _support(logits: np.ndarray, top_k: int, top_p: float, draws: int = 400) -> set[int]:
    keys = jax.random.split(jax.random.key(0), draws)
    rows = jnp.broadcast_to(jnp.asarray(logits), (draws, logits.size))
    tokens = generate._choose(rows, keys, jnp.float32(1.0), top_k, top_p, greedy=False)
    return set(np.asarray(tokens).tolist())


@pytest.mark.parametrize("top_k,top_p,expected", [(2, 1.0, {3, 1}), (0, 0.6, {3, 1}), (0, 0.3, {3}), (0, 0.4, {3, 1}),
                                                  (3, 0.9, {3, 1, 0}), (3, 0.75, {3, 1}), (0, 1.0, {0, 1, 2, 3, 4})])
def test_filters_keep_the_top_k_and_nucleus_sets(top_k, top_p, expected):
    probs = np.array([0.15, 0.3, 0.1, 0.35, 0.1])  # sorted: 3 (0.35), 1 (0.3), 0 (0.15), 2 / 4 (0.1)
    assert _support(np.log(probs), top_k, top_p) == expected


def test_no_sort_when_the_filters_are_off():
    logits = jax.ShapeDtypeStruct((4, 1000), jnp.float32)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 4))

    def hlo(top_k, top_p):
        return jax.jit(lambda l, k: generate._choose(l, k, jnp.float32(0.7), top_k, top_p, False)
                       ).lower(logits, keys).as_text()

    assert "sort" not in hlo(0, 1.0) and "scatter" not in hlo(0, 1.0)
    assert "sort" in hlo(0, 0.9)
