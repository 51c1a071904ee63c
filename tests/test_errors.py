"""Every user mistake gets a TypeError or ValueError naming the argument, at trace time too."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ejkernel_nsa as nsa

rng = np.random.default_rng(7)
B, T, HQ, H, D = 2, 70, 6, 2, 16


def normal(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def good(**changes):
    args = dict(
        query=normal(B, T, HQ, D), key=normal(B, T, H, D), value=normal(B, T, H, 24), g_cmp=normal(B, T, HQ),
        block_counts=2, block_size=16,
    )
    args.update(changes)
    return {k: v for k, v in args.items() if v is not None}


MISTAKES = [
    ("query of rank 3", good(query=normal(B, T, HQ)), ValueError, "query"),
    ("integer query", good(query=np.ones((B, T, HQ, D), np.int32)), TypeError, "query"),
    ("query not an array", good(query="q"), TypeError, "query"),
    # A longer key is SPEC section 10's decoding (tests/test_longer_keys.py); a shorter one is a mistake.
    ("key shorter than the query", good(key=normal(B, T - 1, H, D)), ValueError, "key"),
    ("key with another Dk", good(key=normal(B, T, H, D + 1)), ValueError, "key"),
    ("value with another batch", good(value=normal(B + 1, T, H, 24)), ValueError, "value"),
    ("key in another dtype", good(key=normal(B, T, H, D, dtype=np.float16)), TypeError, "key"),
    ("HQ not a multiple of H", good(key=normal(B, T, 4, D), value=normal(B, T, 4, 24)), ValueError, "query"),
    ("gate of the wrong shape", good(g_cmp=normal(B, T, H)), ValueError, "g_cmp"),
    ("integer gate", good(g_slc=np.ones((B, T, HQ), np.int32)), TypeError, "g_slc"),
    ("g_swa without a window", good(g_swa=normal(B, T, HQ)), ValueError, "g_swa"),
    ("a window without g_swa", good(window_size=8), ValueError, "window_size"),
    ("neither g_cmp nor block_indices", good(g_cmp=None), ValueError, "block_indices"),
    ("float block_indices", good(block_indices=normal(B, T, H, 3)), TypeError, "block_indices"),
    ("block_indices of the wrong shape", good(block_indices=np.zeros((B, T, HQ, 3), np.int32)), ValueError,
     "block_indices"),
    ("array block_counts without a slot count", good(block_counts=np.full((B, T, H), 2, np.int32)), ValueError,
     "max_block_counts"),
    ("float block_counts", good(block_counts=2.0), TypeError, "block_counts"),
    ("block_counts of the wrong shape", good(block_counts=np.full((B, T), 2, np.int32), max_block_counts=2),
     ValueError, "block_counts"),
    ("block_counts above max_block_counts", good(block_counts=5, max_block_counts=4), ValueError, "block_counts"),
    ("block_size 0", good(block_size=0), ValueError, "block_size"),
    ("float block_size", good(block_size=16.0), TypeError, "block_size"),
    ("negative window", good(window_size=-1), ValueError, "window_size"),
    ("cu_seqlens with batch 2", good(cu_seqlens=np.array([0, 30, 70], np.int32)), ValueError, "cu_seqlens"),
    ("float cu_seqlens", good(cu_seqlens=np.array([0.0, 70.0])), TypeError, "cu_seqlens"),
    ("negative softmax_scale", good(softmax_scale=-1.0), ValueError, "softmax_scale"),
    ("unknown backend", good(backend="cuda-magic"), ValueError, "backend"),
]


@pytest.mark.parametrize("args, error, argument", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_is_named(args, error, argument):
    with pytest.raises(error, match=rf"^{re.escape(argument)}\b"):
        nsa.native_sparse_attention(**args)


def test_mistakes_are_caught_at_trace_time_under_jit():
    args = good(key=normal(B, T - 1, H, D))
    with pytest.raises(ValueError, match="^key"):
        jax.jit(lambda q, k, v, g: nsa.native_sparse_attention(q, k, v, g, block_counts=2, block_size=16))(
            args["query"], args["key"], args["value"], args["g_cmp"]
        )


def test_packed_offsets_are_checked_when_concrete():
    one = dict(query=normal(1, T, HQ, D), key=normal(1, T, H, D), value=normal(1, T, H, 24), g_cmp=normal(1, T, HQ))
    for bad in ([0, 30, 60], [5, 30, 70], [0, 40, 30, 70]):
        with pytest.raises(ValueError, match="^cu_seqlens"):
            nsa.native_sparse_attention(**one, cu_seqlens=np.array(bad, np.int32), block_size=16)


def test_token_indices_need_cu_seqlens():
    with pytest.raises(ValueError, match="^token_indices"):
        nsa.apply_native_sparse_attention(
            normal(1, T, HQ, D), normal(1, T, H, D), normal(1, T, H, 24), np.zeros((1, T, H, 2), np.int32),
            block_size=16, token_indices=np.zeros((T, 2), np.int32),
        )


def test_piece_errors_name_the_argument():
    key, value = normal(1, T, H, D), normal(1, T, H, 24)
    k_cmp, v_cmp = nsa.mean_pool(key, value, 16)
    with pytest.raises(ValueError, match="^key_cmp"):
        nsa.compressed_attention(normal(1, T, HQ, D), k_cmp[:, :-1], v_cmp[:, :-1], 16)
    with pytest.raises(ValueError, match="^max_block_counts"):
        nsa.select_blocks(normal(1, T, HQ, D), k_cmp, normal(1, T, HQ), jnp.ones((1, T, H), jnp.int32), 16)
    with pytest.raises(ValueError, match="^block_counts"):
        nsa.select_blocks(normal(1, T, HQ, D), k_cmp, normal(1, T, HQ), 5, 16, max_block_counts=4)
    with pytest.raises(ValueError, match="^window_size"):
        nsa.sliding_window_attention(normal(1, T, HQ, D), key, value, 0)
