"""Generate tokens with a tiny random-weight NSA model and the serving cache, checking every step
against a full recomputation of the whole sequence.

    python examples/generate_with_cache.py [--steps 40] [--prompt-len 21] [--learned-compressor]

Each layer keeps one `ejkernel_nsa.NSACache`. The prompt goes in as one chunked-prefill call
(all its queries against the cache at once), then each new token is one decoding step: append its
key and value (which completes compressed blocks incrementally), attend with its one query. After
every step the same model runs `native_sparse_attention` over the whole sequence so far, and the
last position's logits must agree. A few seconds on a CPU.

`--learned-compressor`: the paper's shape of compression (SPEC section 9: blocks of `l = BLOCK/2`
at stride `d = BLOCK/4` under selection blocks of `BLOCK`) with a learned compressor per layer
(`ejkernel_nsa.compressor`, its last layer random as if trained): the caches are made with the
geometry and the parameters, and each `append` computes `phi` of the blocks it completes.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

import ejkernel_nsa
from ejkernel_nsa import cache as kv_cache
from ejkernel_nsa import compressor

VOCAB, WIDTH, LAYERS = 97, 64, 2
HQ, H, D = 4, 1, 16  # four query heads share one kv head
NSA = dict(block_counts=3, window_size=16)
BLOCK = 8


def init_params(seed: int, learned_compressor: bool = False) -> dict:
    keys = iter(jax.random.split(jax.random.key(seed), 3 + 6 * LAYERS))

    def dense(shape):
        return jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(shape[0])

    layers = [dict(q=dense((WIDTH, HQ * D)), k=dense((WIDTH, H * D)), v=dense((WIDTH, H * D)),
                   gates=dense((WIDTH, 3 * HQ)), out=dense((HQ * D, WIDTH)), mlp=dense((WIDTH, WIDTH)))
              for _ in range(LAYERS)]
    if learned_compressor:
        for i, layer in enumerate(layers):
            init_key, out_key, value_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1000 + i), 3)
            phi = compressor.init(init_key, BLOCK // 2, D, D, hidden=2 * D)
            for branch, key in (("key", out_key), ("value", value_key)):
                # An untrained compressor is exactly mean pooling: pretend this one learned.
                phi[branch]["w_out"] = 0.3 * jax.random.normal(key, (2 * D, D), jnp.float32)
            layer["compressor"] = phi
    return dict(embed=jax.random.normal(next(keys), (VOCAB, WIDTH), jnp.float32), layers=layers,
                unembed=dense((WIDTH, VOCAB)))


def rms_norm(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def project(layer, x):
    """`x` `[B, T, WIDTH]` -> queries, keys, values and the three gates of one layer."""
    B, T, _ = x.shape
    h = rms_norm(x)
    gates = jax.nn.sigmoid(h @ layer["gates"]).reshape(B, T, 3, HQ)
    return ((h @ layer["q"]).reshape(B, T, HQ, D), (h @ layer["k"]).reshape(B, T, H, D),
            (h @ layer["v"]).reshape(B, T, H, D), dict(g_cmp=gates[:, :, 0], g_slc=gates[:, :, 1],
                                                       g_swa=gates[:, :, 2]))


def finish(layer, x, attended):
    B, T = x.shape[:2]
    x = x + attended.reshape(B, T, HQ * D) @ layer["out"]
    return x + jax.nn.gelu(rms_norm(x) @ layer["mlp"])


def logits_of(params, x):
    return rms_norm(x) @ params["unembed"]


def geometry_of(params) -> dict:
    """The compression geometry: the default (disjoint blocks of BLOCK), or with a learned
    compressor the paper's shape (l = BLOCK/2, d = BLOCK/4)."""
    if "compressor" not in params["layers"][0]:
        return dict(block_size=BLOCK)
    return dict(block_size=BLOCK, compress_block_size=BLOCK // 2, compress_stride=BLOCK // 4)


@jax.jit
def full_forward(params, tokens):
    """The whole sequence at once (training-style, TQ == TK): logits `[B, T, VOCAB]`."""
    geometry = geometry_of(params)
    x = params["embed"][tokens]
    for layer in params["layers"]:
        q, k, v, gates = project(layer, x)
        supplied = {}
        if "compressor" in layer:
            supplied = dict(zip(("key_cmp", "value_cmp"), compressor.apply(
                layer["compressor"], k, v, compress_block_size=geometry["compress_block_size"],
                compress_stride=geometry["compress_stride"])))
        x = finish(layer, x, ejkernel_nsa.native_sparse_attention(q, k, v, **geometry, **supplied, **gates, **NSA))
    return logits_of(params, x)


@functools.partial(jax.jit, donate_argnums=1)
def cached_forward(params, caches, tokens):
    """New tokens `[B, n]` after those the caches hold: (the caches, logits `[B, n, VOCAB]`).
    The same function serves the prefill (n = prompt length) and each decoding step (n = 1)."""
    x = params["embed"][tokens]
    new_caches = []
    for layer, cache in zip(params["layers"], caches, strict=True):
        q, k, v, gates = project(layer, x)
        cache = kv_cache.append(cache, k, v, compressor=layer.get("compressor"))  # the cache has the geometry
        x = finish(layer, x, kv_cache.attend(cache, q, **gates, **NSA))
        new_caches.append(cache)
    return new_caches, logits_of(params, x)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompt-len", type=int, default=21)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learned-compressor", action="store_true",
                        help="overlapping compression blocks (l = BLOCK/2, d = BLOCK/4) through a learned compressor")
    args = parser.parse_args(argv)

    params = init_params(args.seed, args.learned_compressor)
    capacity = -(-(args.prompt_len + args.steps) // BLOCK) * BLOCK
    caches = [kv_cache.init(args.batch, capacity, H, D, compressor=layer.get("compressor"), dtype=jnp.float32,
                            **geometry_of(params)) for layer in params["layers"]]
    tokens = jax.random.randint(jax.random.key(args.seed + 1), (args.batch, args.prompt_len), 0, VOCAB)

    def recompute(tokens):
        # Causality makes padding after the last token harmless: one compiled full forward
        # (at the capacity) checks every step.
        padded = jnp.pad(tokens, ((0, 0), (0, capacity - tokens.shape[1])))
        return full_forward(params, padded)[:, :tokens.shape[1]]

    caches, logits = cached_forward(params, caches, tokens)  # the prompt: chunked prefill
    worst = float(jnp.max(jnp.abs(logits - recompute(tokens))))
    sampling = jax.random.key(args.seed + 2)
    for step in range(args.steps):
        next_token = jax.random.categorical(jax.random.fold_in(sampling, step), logits[:, -1])[:, None]
        tokens = jnp.concatenate([tokens, next_token], axis=1)
        caches, logits = cached_forward(params, caches, next_token)  # one decoding step
        worst = max(worst, float(jnp.max(jnp.abs(logits[:, -1] - recompute(tokens)[:, -1]))))
    print(f"generated {args.steps} tokens per row after a {args.prompt_len}-token prompt (batch {args.batch}); "
          f"cache lengths {np.asarray(caches[0].lengths).tolist()} of capacity {capacity}")
    print("row 0:", np.asarray(tokens[0, args.prompt_len:]).tolist())
    print(f"largest logit difference, cache vs full recomputation, over every step: {worst:.2e}")
    if worst > 1e-3:
        raise SystemExit("the cached generation disagrees with the full recomputation")
    return worst


if __name__ == "__main__":
    main()
