"""One training step of a small NSA language model with data + context parallelism.

The mesh is 2 x 4: the batch over "data", the tokens over "seq". The attention layer runs
`context_parallel_nsa` (zigzag load balance; the token ids are laid out that way once, here); the
position-wise layers (embedding, projections, MLP, loss) are left to XLA's partitioner. The step
is checked against the same step on one device.

  python examples/train_step_dp_cp.py        # on CPU: 8 host devices are made for it
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ejkernel_nsa  # noqa: E402
from ejkernel_nsa.context_parallel import context_parallel_nsa, to_zigzag  # noqa: E402

VOCAB, MODEL, Q_HEADS, KV_HEADS, HEAD_DIM = 256, 64, 4, 2, 16
NSA = dict(block_counts=4, block_size=16, window_size=32)


def init(key):
    shapes = {"embed": (VOCAB, MODEL), "wq": (MODEL, Q_HEADS * HEAD_DIM), "wk": (MODEL, KV_HEADS * HEAD_DIM),
              "wv": (MODEL, KV_HEADS * HEAD_DIM), "wg": (MODEL, 3 * Q_HEADS), "wo": (Q_HEADS * HEAD_DIM, MODEL),
              "w1": (MODEL, 4 * MODEL), "w2": (4 * MODEL, MODEL)}
    keys = jax.random.split(key, len(shapes))
    return {name: jax.random.normal(k, shape) / jnp.sqrt(shape[0]) for k, (name, shape) in zip(keys, shapes.items())}


def forward(params, tokens, attention):
    batch, seq = tokens.shape
    x = params["embed"][tokens]
    q = (x @ params["wq"]).reshape(batch, seq, Q_HEADS, HEAD_DIM)
    k = (x @ params["wk"]).reshape(batch, seq, KV_HEADS, HEAD_DIM)
    v = (x @ params["wv"]).reshape(batch, seq, KV_HEADS, HEAD_DIM)
    g_cmp, g_slc, g_swa = jnp.split(jax.nn.sigmoid(x @ params["wg"]), 3, axis=-1)
    o = attention(q, k, v, g_cmp, g_slc, g_swa).reshape(batch, seq, Q_HEADS * HEAD_DIM)
    x = x + o @ params["wo"]
    x = x + jax.nn.gelu(x @ params["w1"]) @ params["w2"]
    return x @ params["embed"].T


def loss_fn(params, tokens, targets, attention):
    logits = forward(params, tokens, attention)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1).mean()


def make_step(attention, learning_rate=0.1):
    @jax.jit
    def step(params, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets, attention)
        return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads), loss

    return step


def main() -> None:
    mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)
    seq_parts = mesh.shape["seq"]
    batch, seq = 4, 512
    params = init(jax.random.key(0))
    stream = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, VOCAB)
    tokens, targets = stream[:, :-1], stream[:, 1:]

    def cp_attention(q, k, v, g_cmp, g_slc, g_swa):
        return context_parallel_nsa(q, k, v, g_cmp, g_slc, g_swa=g_swa, mesh=mesh, seq_axis="seq",
                                    batch_axis="data", load_balance="zigzag", **NSA)

    def one_device_attention(q, k, v, g_cmp, g_slc, g_swa):
        return ejkernel_nsa.native_sparse_attention(q, k, v, g_cmp, g_slc, g_swa=g_swa, **NSA)

    # Data + context parallel: the data loader lays the tokens out in zigzag order once. Every
    # position-wise layer is indifferent to the order; the loss is a mean over tokens.
    tokens_dist = jax.device_put(to_zigzag(tokens, seq_parts), NamedSharding(mesh, P("data", "seq")))
    targets_dist = jax.device_put(to_zigzag(targets, seq_parts), NamedSharding(mesh, P("data", "seq")))
    params_dist = jax.device_put(params, NamedSharding(mesh, P()))
    new_params, loss = make_step(cp_attention)(params_dist, tokens_dist, targets_dist)
    reference_params, reference_loss = make_step(one_device_attention)(params, tokens, targets)
    worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new_params),
                                                                jax.tree.leaves(reference_params), strict=True))
    print(f"devices: {jax.device_count()}, mesh {dict(mesh.shape)}")
    print(f"loss (data + context parallel): {float(loss):.6f}; one device: {float(reference_loss):.6f}")
    print(f"largest parameter difference after the step: {worst:.2e}")
    if abs(float(loss) - float(reference_loss)) > 1e-5 or worst > 1e-5:
        raise SystemExit("the parallel step differs from the one-device step")


if __name__ == "__main__":
    main()
