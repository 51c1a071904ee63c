"""The serving cache (ejkernel_nsa.cache): decoding steps and chunked prefill against the float64
oracle (SPEC section 10), under jit, lax.scan and donation, with rows of different lengths; the
compressed blocks it keeps against the oracle's mean pooling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import assert_close

import ejkernel_nsa as nsa
from ejkernel_nsa import cache as kv_cache
from ejkernel_nsa import compressor
from ejkernel_nsa.testing import oracle

B, H, G, DK, DV, BS, CAPACITY = 2, 2, 2, 16, 8, 8, 96
HQ = G * H
OPTIONS = dict(block_counts=3, window_size=7)
# Importing the backends registers JAX config states (the Pallas lowerings), which changes the
# tracing context between a first trace and the next: load them before any compile-count check.
nsa.backend_status()


def sequence(seed, length, dtype=np.float32):
    """A random sequence per row: queries, keys, values and the three gates, `[B, length, ...]`."""
    rng = np.random.default_rng(seed)

    def cast(x):
        return np.asarray(jnp.asarray(x, dtype))

    gates = [cast(1 / (1 + np.exp(-rng.standard_normal((B, length, HQ))))) for _ in range(3)]
    return dict(query=cast(rng.standard_normal((B, length, HQ, DK))), key=cast(rng.standard_normal((B, length, H, DK))),
                value=cast(rng.standard_normal((B, length, H, DV))), g_cmp=gates[0], g_slc=gates[1], g_swa=gates[2])


def rows(x: dict, start: int, stop: int) -> dict:
    return {name: a[:, start:stop] for name, a in x.items()}


def expected_rows(seq: dict, lengths, query_len: int, **options) -> np.ndarray:
    """The oracle's output for the last `query_len` tokens of each row's first `lengths[b]`."""
    out = []
    for b, n in enumerate(lengths):
        one = {name: a[b:b + 1] for name, a in seq.items()}
        queries = {name: one[name][:, n - query_len:n] for name in ("query", "g_cmp", "g_slc", "g_swa")}
        out.append(oracle.nsa_forward_cached(
            queries["query"], one["key"][:, :n], one["value"][:, :n], None, g_cmp=queries["g_cmp"],
            g_slc=queries["g_slc"], g_swa=queries["g_swa"], block_size=BS, **options,
        )["o"][0])
    return np.stack(out)


def attend(cache, x, **options):
    return kv_cache.attend(cache, x["query"], g_cmp=x["g_cmp"], g_slc=x["g_slc"], g_swa=x["g_swa"], **options)


def prefilled(seq, prompt_lengths, dtype=jnp.float32):
    """A cache holding each row's prompt (rows of different lengths through `num_new`)."""
    cache = kv_cache.init(B, CAPACITY, H, DK, DV, block_size=BS, dtype=dtype)
    longest = max(prompt_lengths)
    return kv_cache.append(cache, seq["key"][:, :longest], seq["value"][:, :longest],
                           num_new=np.asarray(prompt_lengths, np.int32))


def test_decode_steps_match_oracle_under_jit_with_donation():
    seq = sequence(0, 40)
    prompt = (13, 24)
    cache = prefilled(seq, prompt)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(cache, token):
        cache = kv_cache.append(cache, token["key"], token["value"])
        return cache, attend(cache, token, **OPTIONS)

    for i in range(14):
        # Each row's next token: row b is at its own position prompt[b] + i.
        token = {name: np.stack([a[b, prompt[b] + i:prompt[b] + i + 1] for b in range(B)]) for name, a in seq.items()}
        cache, out = step(cache, token)
        lengths = [n + i + 1 for n in prompt]
        aligned = {name: np.stack([np.concatenate([a[b, :lengths[b]], np.zeros_like(a[b, :40 - lengths[b]])])
                                   for b in range(B)]) for name, a in seq.items()}
        assert_close(f"step {i}", out, expected_rows(aligned, lengths, 1, **OPTIONS), 1e-4)
    assert step._cache_size() == 1, "a decoding step must compile once for every length"
    np.testing.assert_array_equal(cache.lengths, [27, 38])


def test_compressed_blocks_are_completed_incrementally():
    seq = sequence(1, 70)
    cache = prefilled(seq, (5, 11))
    append = jax.jit(kv_cache.append)
    for start, stop in ((11, 12), (12, 20), (20, 21), (21, 50), (50, 59)):
        cache = append(cache, seq["key"][:, start:stop], seq["value"][:, start:stop])
    lengths = np.asarray(cache.lengths).tolist()
    assert lengths == [53, 59]
    # Row 0 holds its 5 prompt tokens and then tokens 11..58; row 1 tokens 0..58.
    def aligned(x):
        row0 = np.concatenate([x[0, :5], x[0, 11:59]])
        return np.stack([np.pad(row0, ((0, CAPACITY - 53), (0, 0), (0, 0))),
                         np.pad(x[1, :59], ((0, CAPACITY - 59), (0, 0), (0, 0)))])

    aligned_key = aligned(seq["key"])
    k_cmp, v_cmp = oracle.mean_pool_cached(aligned_key, aligned(seq["value"]), BS, lengths)
    np.testing.assert_allclose(cache.key_cmp, k_cmp, atol=2e-6)
    np.testing.assert_allclose(cache.value_cmp, v_cmp, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(cache.key)[0, :53], aligned_key[0, :53])


@pytest.mark.parametrize("chunk", [2, 9, 24])
def test_chunked_prefill_equals_the_full_sequence_rows(chunk):
    total = 60
    seq = sequence(2, total)
    cache = prefilled(seq, (4, 4))
    full = oracle.nsa_forward(seq["query"], seq["key"], seq["value"], seq["g_cmp"], seq["g_slc"], block_size=BS,
                              g_swa=seq["g_swa"], **OPTIONS)
    # Near ties of the top-k may legitimately differ: compare the selection's well-separated heads.
    keep = np.repeat(oracle.near_tie_mask(full["scores"], 3, 3, G), G, axis=2)

    @jax.jit
    def prefill(cache, x):
        cache = kv_cache.append(cache, x["key"], x["value"])
        return cache, attend(cache, x, **OPTIONS)

    outs = []
    for start in range(4, total, chunk):
        cache, out = prefill(cache, rows(seq, start, min(start + chunk, total)))
        outs.append(np.asarray(out))
    outs = np.concatenate(outs, axis=1)
    assert_close(f"chunks of {chunk}", outs[keep[:, 4:]], full["o"][:, 4:][keep[:, 4:]], 1e-4)


def test_scan_over_decode_steps():
    seq = sequence(3, 30)
    cache = prefilled(seq, (10, 10))
    steps = {name: np.swapaxes(a[:, 10:30], 0, 1)[:, :, None] for name, a in seq.items()}  # [steps, B, 1, ...]

    @jax.jit
    def generate(cache, steps):
        def body(cache, token):
            cache = kv_cache.append(cache, token["key"], token["value"])
            return cache, attend(cache, token, block_counts=2, window_size=5)

        return jax.lax.scan(body, cache, steps)

    cache, outs = generate(cache, steps)
    outs = np.swapaxes(np.asarray(outs)[:, :, 0], 0, 1)  # [B, steps, HQ, DV]
    full = oracle.nsa_forward(seq["query"], seq["key"], seq["value"], seq["g_cmp"], seq["g_slc"], block_counts=2,
                              block_size=BS, g_swa=seq["g_swa"], window_size=5)
    keep = np.repeat(oracle.near_tie_mask(full["scores"], 2, 2, G), G, axis=2)[:, 10:]
    assert_close("scan", outs[keep], full["o"][:, 10:][keep], 1e-4)


def test_bfloat16_cache():
    seq = sequence(4, 33, dtype=jnp.bfloat16)
    cache = prefilled(seq, (32, 20), dtype=jnp.bfloat16)
    token = {name: np.stack([a[0, 32:33], a[1, 20:21]]) for name, a in seq.items()}
    cache = kv_cache.append(cache, token["key"], token["value"])
    out = jax.jit(functools.partial(attend, **OPTIONS))(cache, token)
    assert out.dtype == jnp.bfloat16
    aligned = {name: np.stack([a[0], np.concatenate([a[1, :21], a[1, 21:]])]) for name, a in seq.items()}
    expected = expected_rows(aligned, [33, 21], 1, **OPTIONS)
    assert_close("bfloat16 decode", out, expected, 2e-2)


def test_stale_slots_past_the_lengths_never_reach_the_output():
    seq = sequence(5, 40)
    cache = prefilled(seq, (9, 37))
    slots = np.arange(CAPACITY)[None, :, None, None] >= np.asarray(cache.lengths)[:, None, None, None]
    poisoned = nsa.NSACache(jnp.where(slots, jnp.nan, cache.key), jnp.where(slots, jnp.inf, cache.value),
                            cache.key_cmp.at[:, 5:].set(jnp.nan), cache.value_cmp.at[:, 5:].set(jnp.nan),
                            cache.lengths, cache.block_size)
    token = {name: np.stack([a[0, 8:9], a[1, 36:37]]) for name, a in seq.items()}
    run = jax.jit(functools.partial(attend, **OPTIONS))
    clean, dirty = run(cache, token), run(poisoned, token)
    assert np.all(np.isfinite(dirty))
    np.testing.assert_array_equal(clean, dirty)


def test_mistakes_are_named():
    cache = kv_cache.init(B, CAPACITY, H, DK, DV, block_size=BS, dtype=jnp.float32)
    key, value = np.zeros((B, 3, H, DK), np.float32), np.zeros((B, 3, H, DV), np.float32)
    for call, argument in [
        (lambda: kv_cache.init(B, 100, H, DK, block_size=BS), "capacity"),
        (lambda: kv_cache.init(B, CAPACITY, H, DK, block_size=BS, dtype=jnp.int32), "dtype"),
        (lambda: kv_cache.append(cache, key.astype(np.float16), value), "key"),
        (lambda: kv_cache.append(cache, np.zeros((B, 3, H + 1, DK), np.float32), value), "key"),
        (lambda: kv_cache.append(cache, key, np.zeros((B, 4, H, DV), np.float32)), "value"),
        (lambda: kv_cache.append(cache, np.zeros((B, 97, H, DK), np.float32),
                                 np.zeros((B, 97, H, DV), np.float32)), "key"),
        (lambda: kv_cache.append(cache, key, value, num_new=np.array([4, 1])), "num_new"),
        (lambda: kv_cache.attend(kv_cache.append(cache, key, value), np.zeros((B, 4, HQ, DK), np.float32),
                                 g_cmp=np.zeros((B, 4, HQ), np.float32)), "kv_lengths"),
    ]:
        with pytest.raises((TypeError, ValueError), match=rf"^{argument}\b"):
            call()


def test_from_keys_matches_appending():
    seq = sequence(6, CAPACITY)
    lengths = np.array([CAPACITY, 37], np.int32)
    built = kv_cache.from_keys(seq["key"], seq["value"], lengths, block_size=BS)
    k_cmp, v_cmp = oracle.mean_pool_cached(seq["key"], seq["value"], BS, lengths.tolist())
    np.testing.assert_allclose(built.key_cmp, k_cmp, atol=2e-6)
    np.testing.assert_allclose(built.value_cmp, v_cmp, atol=2e-6)
    np.testing.assert_array_equal(built.lengths, lengths)


# ---- SPEC section 9's geometry and a learned compressor in the cache ---------------------------

# (l, d, l'): the paper's setting and a smaller one of the same shape. block_counts=4 leaves the
# selection a real choice past the forced first, previous and current blocks.
GEOMETRIES = [(32, 16, 64), (16, 8, 32)]
GEOMETRY_OPTIONS = dict(block_counts=4, window_size=7)
GEOMETRY_CAPACITY = 384
# One program per shape rather than one per operation: the test's eager calls compile less.
apply_compressor = jax.jit(compressor.apply, static_argnames=("compress_block_size", "compress_stride"))


def geometry_of(length, stride, block_size):
    return dict(block_size=block_size, compress_block_size=length, compress_stride=stride)


def tokens_at(seq: dict, starts, n: int) -> dict:
    """Each row's `n` tokens from its own position `starts[b]`."""
    return {name: np.stack([a[b, s:s + n] for b, s in enumerate(starts)]) for name, a in seq.items()}


def full_rows(seq: dict, starts, n: int, **options):
    """The oracle's full-sequence output at each row's positions `[starts[b], starts[b] + n)`, and
    where its selection is not a near tie (those may legitimately differ)."""
    full = oracle.nsa_forward(seq["query"], seq["key"], seq["value"], seq["g_cmp"], seq["g_slc"], g_swa=seq["g_swa"],
                              **options)
    keep = np.repeat(oracle.near_tie_mask(full["scores"], options["block_counts"], options["block_counts"], G), G,
                     axis=2)
    return (np.stack([full["o"][b, s:s + n] for b, s in enumerate(starts)]),
            np.stack([keep[b, s:s + n] for b, s in enumerate(starts)]))


def decode(cache, seq: dict, prompt, chunk: int, steps: int, compressor=None):
    """A chunk of `chunk` tokens after each row's prompt, then `steps` single tokens, jitted with
    the cache donated; the outputs `[B, chunk + steps, HQ, DV]`."""
    @functools.partial(jax.jit, donate_argnums=0)
    def step(cache, x, compressor):
        cache = kv_cache.append(cache, x["key"], x["value"], compressor=compressor)
        return cache, attend(cache, x, **GEOMETRY_OPTIONS)

    cache, out = step(cache, tokens_at(seq, prompt, chunk), compressor)
    outs = [out]
    for i in range(steps):
        cache, out = step(cache, tokens_at(seq, [p + chunk + i for p in prompt], 1), compressor)
        outs.append(out)
    return cache, np.concatenate([np.asarray(o) for o in outs], axis=1)


def learned_params(length, seed):
    """A compressor whose MLP is not zero (an untrained one is exactly mean pooling)."""
    params = compressor.init(jax.random.key(seed), length, DK, DV, hidden=16)
    rng = np.random.default_rng(seed)
    for branch, dim in (("key", DK), ("value", DV)):
        params[branch]["w_out"] = jnp.asarray(0.3 * rng.standard_normal((16, dim)), jnp.float32)
        params[branch]["b_out"] = jnp.asarray(0.1 * rng.standard_normal(dim), jnp.float32)
    return params


@pytest.mark.parametrize("length, stride, block_size", GEOMETRIES)
def test_geometry_prefill_chunk_and_steps_equal_the_full_sequence(length, stride, block_size):
    """Prompts of different lengths (num_new), a chunk of 5, then single steps, with l, d, l' of
    SPEC 9: every output equals the oracle's full-sequence row at its position, and the cached
    blocks its overlapping means of each row's prefix."""
    geometry = geometry_of(length, stride, block_size)
    prompt, chunk, steps = (275, 298), 5, 4
    seq = sequence(10 + length, max(prompt) + chunk + steps)
    cache = kv_cache.init(B, GEOMETRY_CAPACITY, H, DK, DV, dtype=jnp.float32, **geometry)
    assert (cache.block_size, cache.compress_block_size, cache.compress_stride) == (block_size, length, stride)
    assert cache.key_cmp.shape == (B, GEOMETRY_CAPACITY // stride, H, DK)
    cache = kv_cache.append(cache, seq["key"][:, :max(prompt)], seq["value"][:, :max(prompt)],
                            num_new=np.asarray(prompt, np.int32))
    cache, outs = decode(cache, seq, prompt, chunk, steps)
    expected, keep = full_rows(seq, prompt, chunk + steps, **geometry, **GEOMETRY_OPTIONS)
    assert_close(f"l={length} d={stride} l'={block_size}", outs[keep], expected[keep], 1e-4)
    lengths = [p + chunk + steps for p in prompt]
    np.testing.assert_array_equal(cache.lengths, lengths)
    for b, n in enumerate(lengths):
        k_cmp, v_cmp = oracle.overlapping_pool(seq["key"][b:b + 1, :n], seq["value"][b:b + 1, :n], length, stride)
        blocks = k_cmp.shape[1]
        np.testing.assert_allclose(cache.key_cmp[b, :blocks], k_cmp[0], atol=2e-6)
        np.testing.assert_allclose(cache.value_cmp[b, :blocks], v_cmp[0], atol=2e-6)
        assert not np.any(np.asarray(cache.key_cmp[b, blocks:])), "blocks past a row's tokens stay zero"


def test_learned_compressor_blocks_equal_apply_and_decode_equals_the_full_sequence():
    """A learned compressor's cache (prompts of different lengths, a chunk, steps under lax.scan):
    its blocks equal `compressor.apply` on each row's sequence, as do `from_keys`'s, and each
    output the oracle's full-sequence row given apply's blocks."""
    length, stride, block_size = GEOMETRIES[1]
    geometry = geometry_of(length, stride, block_size)
    params = learned_params(length, 7)
    prompt, chunk, steps = (150, 171), 3, 5
    seq = sequence(11, max(prompt) + chunk + steps)
    cache = kv_cache.init(B, GEOMETRY_CAPACITY, H, DK, DV, dtype=jnp.float32, compressor=params, **geometry)
    cache = kv_cache.append(cache, seq["key"][:, :max(prompt)], seq["value"][:, :max(prompt)],
                            num_new=np.asarray(prompt, np.int32), compressor=params)
    cache = kv_cache.append(cache, *(tokens_at(seq, prompt, chunk)[name] for name in ("key", "value")),
                            compressor=params)
    scanned = {name: np.swapaxes(tokens_at(seq, [p + chunk for p in prompt], steps)[name], 0, 1)[:, :, None]
               for name in seq}  # [steps, B, 1, ...]

    @jax.jit
    def generate(cache, scanned, params):
        def body(cache, token):
            cache = kv_cache.append(cache, token["key"], token["value"], compressor=params)
            return cache, attend(cache, token, **GEOMETRY_OPTIONS)

        return jax.lax.scan(body, cache, scanned)

    cache, outs = generate(cache, scanned, params)
    outs = np.swapaxes(np.asarray(outs)[:, :, 0], 0, 1)  # [B, steps, HQ, DV]
    lengths = [p + chunk + steps for p in prompt]
    np.testing.assert_array_equal(cache.lengths, lengths)
    aligned_key = np.zeros((B, GEOMETRY_CAPACITY, H, DK), np.float32)
    aligned_value = np.zeros((B, GEOMETRY_CAPACITY, H, DV), np.float32)
    for b, n in enumerate(lengths):
        k_cmp, v_cmp = apply_compressor(params, seq["key"][b:b + 1, :n], seq["value"][b:b + 1, :n],
                                        compress_block_size=length, compress_stride=stride)
        blocks = k_cmp.shape[1]
        np.testing.assert_allclose(cache.key_cmp[b, :blocks], k_cmp[0], atol=1e-5)
        np.testing.assert_allclose(cache.value_cmp[b, :blocks], v_cmp[0], atol=1e-5)
        assert not np.any(np.asarray(cache.key_cmp[b, blocks:])), "blocks past a row's tokens stay zero"
        aligned_key[b, :n], aligned_value[b, :n] = seq["key"][b, :n], seq["value"][b, :n]
    built = kv_cache.from_keys(aligned_key, aligned_value, np.asarray(lengths, np.int32), compressor=params,
                               **geometry)
    np.testing.assert_allclose(built.key_cmp, cache.key_cmp, atol=1e-5)
    np.testing.assert_allclose(built.value_cmp, cache.value_cmp, atol=1e-5)
    assert built.learned_compression

    # The full sequence's blocks are apply's: a query sees only the complete ones, which are its own.
    k_cmp, v_cmp = apply_compressor(params, seq["key"], seq["value"], compress_block_size=length,
                                    compress_stride=stride)
    full = oracle.nsa_forward(seq["query"], seq["key"], seq["value"], seq["g_cmp"], seq["g_slc"], g_swa=seq["g_swa"],
                              key_cmp=np.asarray(k_cmp), value_cmp=np.asarray(v_cmp), **geometry,
                              **GEOMETRY_OPTIONS)
    keep = np.repeat(oracle.near_tie_mask(full["scores"], 4, 4, G), G, axis=2)
    starts = [p + chunk for p in prompt]
    expected = np.stack([full["o"][b, s:s + steps] for b, s in enumerate(starts)])
    keep = np.stack([keep[b, s:s + steps] for b, s in enumerate(starts)])
    assert_close("learned compressor decode", outs[keep], expected[keep], 1e-4)


def test_geometry_mistakes_are_named():
    params = learned_params(32, 0)
    mean_cache = kv_cache.init(B, 128, H, DK, DV, block_size=64, compress_block_size=32, compress_stride=16,
                               dtype=jnp.float32)
    learned_cache = kv_cache.init(B, 128, H, DK, DV, block_size=64, compress_block_size=32, compress_stride=16,
                                  compressor=params, dtype=jnp.float32)
    key, value = np.zeros((B, 3, H, DK), np.float32), np.zeros((B, 3, H, DV), np.float32)
    for call, argument, words in [
        (lambda: kv_cache.init(B, 128, H, DK, block_size=64, compress_block_size=32, compress_stride=12),
         "compress_stride", "divide the compression block length"),
        (lambda: kv_cache.init(B, 96, H, DK, block_size=48, compress_block_size=32, compress_stride=32),
         "compress_stride", "divide the selection block"),
        (lambda: kv_cache.init(B, 96, H, DK, block_size=64, compress_block_size=32, compress_stride=16),
         "capacity", "multiple of block_size=64"),
        (lambda: kv_cache.init(B, 128, H, DK, block_size=64, compress_block_size=0), "compress_block_size", ""),
        (lambda: kv_cache.from_keys(np.zeros((B, 96, H, DK), np.float32), np.zeros((B, 96, H, DV), np.float32),
                                    block_size=64, compress_block_size=32, compress_stride=16), "key",
         "multiple of block_size=64"),
        (lambda: kv_cache.init(B, 128, H, DK, DV, block_size=64, compress_block_size=16, compressor=params),
         "compressor", "blocks of 32 tokens"),
        (lambda: kv_cache.init(B, 128, H, DK, DV, block_size=64, compress_block_size=32, compressor=[1]),
         "compressor", "compressor.init's dict"),
        (lambda: kv_cache.append(mean_cache, key, value, compressor=params), "compressor", "mean-pooled"),
        (lambda: kv_cache.append(learned_cache, key, value), "compressor", "pass its parameters"),
    ]:
        with pytest.raises((TypeError, ValueError), match=rf"^{argument}\b.*{words}"):
            call()
