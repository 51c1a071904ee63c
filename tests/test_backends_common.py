"""The shared attention custom_vjp (backends/common/vjp.py), outside any kernel.

A toy "kernel" (dense causal attention in jnp, its backward written by hand the way the flash
kernels write theirs, from lse and delta) is wired through `attention_vjp` and compared with JAX's
own derivative of the textbook definition in float64: a wrong delta, a dropped or mis-signed lse
cotangent or a mis-ordered static argument shows up as a gradient mismatch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ejkernel_nsa.backends.common.vjp import attention_vjp


def _scores(q, k, scale):
    s = jnp.einsum("td,sd->ts", q, k) * scale
    causal = jnp.arange(q.shape[0])[:, None] >= jnp.arange(k.shape[0])[None, :]
    return jnp.where(causal, s, -jnp.inf), causal


def _toy_forward(q, k, v, scale):
    s, _ = _scores(q, k, scale)
    lse = jax.nn.logsumexp(s, axis=-1)
    return jnp.exp(s - lse[:, None]) @ v, lse, (q, k, v)


def _toy_backward(scale, saved, d_out, lse, delta):
    q, k, v = saved
    s, causal = _scores(q, k, scale)
    p = jnp.where(causal, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (d_out @ v.T - delta[:, None])
    return ds @ k * scale, ds.T @ q * scale, p.T @ d_out


def _reference(q, k, v, scale):
    s, _ = _scores(q, k, scale)
    return jax.nn.softmax(s, axis=-1) @ v, jax.nn.logsumexp(s, axis=-1)


@pytest.mark.parametrize("returns_lse", [False, True], ids=["out", "out_and_lse"])
def test_attention_vjp_matches_autodiff_of_the_definition(returns_lse):
    rng = np.random.default_rng()
    T, D, Dv, scale = 12, 8, 6, 0.35
    q, k, v = (rng.standard_normal(shape) for shape in [(T, D), (T, D), (T, Dv)])
    d_out, d_lse = rng.standard_normal((T, Dv)), rng.standard_normal(T)
    attend = attention_vjp(_toy_forward, _toy_backward, nondiff_argnums=(3,), returns_lse=returns_lse)

    as32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    outputs, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, scale), *as32)
    cotangent = (jnp.asarray(d_out, jnp.float32), jnp.asarray(d_lse, jnp.float32)) if returns_lse else (
        jnp.asarray(d_out, jnp.float32))
    grads = vjp(cotangent)

    with jax.enable_x64(True):
        def reference(q, k, v):
            out, lse = _reference(q, k, v, scale)
            return (out, lse) if returns_lse else out

        want_outputs, want_vjp = jax.vjp(reference, *(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
        want_grads = want_vjp((jnp.asarray(d_out), jnp.asarray(d_lse)) if returns_lse else jnp.asarray(d_out))
        want_outputs = [np.asarray(x) for x in (want_outputs if returns_lse else (want_outputs,))]
        want_grads = [np.asarray(g) for g in want_grads]

    for got, want in zip(outputs if returns_lse else (outputs,), want_outputs):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
