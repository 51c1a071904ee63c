"""The Flax NNX layer (`ejkernel_nsa.nnx.NativeSparseAttention`) and its plain-JAX helpers.

The layer is checked against a composition written here from scratch with the layer's own
parameters: matrix products, a complex-number rotary embedding, sigmoid gates and
`native_sparse_attention`, so a wrong head layout, gate order or rotation shows up as a value
difference. The kernels themselves are the backend suites' business. Skipped without Flax,
except the check that `ejkernel_nsa` imports without it.
"""

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ejkernel_nsa
from ejkernel_nsa import compressor
from ejkernel_nsa.padding import pack, packing_from_mask, unpack
from ejkernel_nsa.rotary import apply_rotary

try:
    from flax import nnx

    from ejkernel_nsa.nnx import NativeSparseAttention
except ImportError:  # the layer's tests skip; the import test below still runs
    nnx = None

needs_flax = pytest.mark.skipif(nnx is None, reason="flax is not installed (pip install 'ejkernel-nsa[nnx]')")

# Small enough for a 2-core CPU, large enough that selection matters: T = 88 is 5.5 blocks of 16
# (a partial last block), 3 of which are selected, and the window (24) is shorter than T.
HIDDEN, HQ, H, D = 48, 4, 2, 12
OPTIONS = dict(block_size=16, block_counts=3, window_size=24)
B, T = 2, 88


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def make_layer(seed=0, **overrides):
    kwargs = dict(num_heads=HQ, num_kv_heads=H, head_dim=D, **OPTIONS) | overrides
    return NativeSparseAttention(HIDDEN, rngs=nnx.Rngs(seed), **kwargs)


def random_x(seed=1, batch=B, seq_len=T):
    return jax.random.normal(jax.random.key(seed), (batch, seq_len, HIDDEN), jnp.float32)


def rope_by_complex_numbers(x, positions, theta=10000.0):
    """Rotary embedding as a complex product: feature pairs (i, i + D/2) are one complex number."""
    half = x.shape[-1] // 2
    z = x[..., :half].astype(jnp.float32) + 1j * x[..., half:].astype(jnp.float32)
    freqs = theta ** (-2.0 * jnp.arange(half) / x.shape[-1])
    z = z * jnp.exp(1j * positions[..., None, None] * freqs)
    return jnp.concatenate([z.real, z.imag], axis=-1).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("heads", "kv_heads", "window_size", "geometry"))
def composition(params, x, positions=None, cmp_params=None, *, heads=HQ, kv_heads=H,
                window_size=OPTIONS["window_size"], geometry=(None, None)):
    """The layer's function, written out with its parameters (a dict of kernels), SPEC 9's
    geometry `(l, d)` and, with `cmp_params`, the learned compressor applied to the rotated k, v."""
    batch, seq_len, _ = x.shape
    positions = jnp.arange(seq_len)[None].repeat(batch, 0) if positions is None else positions
    q = (x @ params["q"]).reshape(batch, seq_len, heads, D)
    k = (x @ params["k"]).reshape(batch, seq_len, kv_heads, D)
    v = (x @ params["v"]).reshape(batch, seq_len, kv_heads, D)
    q, k = rope_by_complex_numbers(q, positions), rope_by_complex_numbers(k, positions)
    branches = ("g_cmp", "g_slc", "g_swa") if window_size else ("g_cmp", "g_slc")
    gates = jax.nn.sigmoid(x @ params["g"]).reshape(batch, seq_len, heads, len(branches))
    length, stride = geometry
    supplied = {}
    if cmp_params is not None:
        key_cmp, value_cmp = compressor.apply(cmp_params, k, v, compress_block_size=length or OPTIONS["block_size"],
                                              compress_stride=stride)
        supplied = dict(key_cmp=key_cmp, value_cmp=value_cmp)
    out = ejkernel_nsa.native_sparse_attention(
        q, k, v, **{name: gates[..., i] for i, name in enumerate(branches)},
        block_counts=OPTIONS["block_counts"], block_size=OPTIONS["block_size"], window_size=window_size,
        compress_block_size=length, compress_stride=stride, **supplied,
    )
    return out.reshape(batch, seq_len, heads * D) @ params["o"]


def call(layer, x, mask=None):
    """The layer under `nnx.jit`: one compiled graph is much faster on CPU than op-by-op dispatch."""
    return _jitted_call(layer, x, mask)


if nnx is not None:
    _jitted_call = nnx.jit(lambda layer, x, mask: layer(x, mask))


def kernels(layer):
    return {name: getattr(layer, f"{name}_proj").kernel[...] for name in ("q", "k", "v", "g", "o")}


# ---- the plain-JAX helpers (no Flax needed) ------------------------------------------------------


def test_rotary_matches_complex_rotation_and_keeps_relative_positions():
    apply_rotary_jit = jax.jit(apply_rotary, static_argnames=("rotary_dim",))
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], (2, 40, 3, 8))
    positions = jax.random.randint(keys[1], (2, 40), 0, 5000)
    np.testing.assert_allclose(apply_rotary_jit(x, positions), jax.jit(rope_by_complex_numbers)(x, positions), atol=2e-4)
    # <rope(q, m), rope(k, n)> depends on m - n only: shift both positions by the same amount.
    q, k = x[:, :1], jax.random.normal(keys[2], (2, 1, 3, 8))
    shift = jnp.full((2, 1), 777)
    m, n = jnp.array([[5], [900]]), jnp.array([[2], [17]])
    dot = lambda a, b: jnp.sum(a * b, axis=-1)  # noqa: E731
    np.testing.assert_allclose(dot(apply_rotary_jit(q, m), apply_rotary_jit(k, n)),
                               dot(apply_rotary_jit(q, m + shift), apply_rotary_jit(k, n + shift)), rtol=1e-4, atol=1e-4)
    # A partial rotation leaves the tail features alone.
    partial = apply_rotary_jit(x, positions, rotary_dim=4)
    np.testing.assert_array_equal(partial[..., 4:], x[..., 4:])
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary(x, positions, rotary_dim=10)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(x, positions[:, :3])


def test_packing_round_trip_and_offsets():
    rng = np.random.default_rng(0)
    positions = np.arange(9)
    # Left padding, an empty row, no padding, right padding, and a row with holes.
    mask = np.stack([positions >= 4, positions < 0, positions >= 0, positions < 3, rng.random(9) < 0.5])
    packing = packing_from_mask(jnp.asarray(mask.astype(np.int32)))
    per_row = mask.sum(1)
    np.testing.assert_array_equal(packing.cu_seqlens, np.concatenate([[0], np.cumsum(per_row), [mask.size]]))
    x = jax.random.normal(jax.random.key(0), mask.shape + (3,))
    packed = pack(x, packing)
    assert packed.shape == (1, mask.size, 3)
    np.testing.assert_array_equal(packed[0, :per_row.sum()], np.asarray(x)[mask])
    np.testing.assert_array_equal(unpack(packed, packing), np.where(mask[..., None], x, 0))
    np.testing.assert_array_equal(packing.positions, np.where(mask, np.cumsum(mask, 1) - 1, 0))
    with pytest.raises(TypeError, match="attention_mask"):
        packing_from_mask(jnp.ones((2, 3), jnp.float32))
    with pytest.raises(ValueError, match="attention_mask"):
        packing_from_mask(jnp.ones((2, 3, 1), bool))


def test_ejkernel_nsa_imports_without_flax_and_the_layer_says_how_to_install_it():
    # A None entry in sys.modules makes `import flax` fail as if it were not installed.
    script = textwrap.dedent("""
        import sys
        sys.modules["flax"] = None
        import ejkernel_nsa
        assert "flax" not in [m for m in sys.modules if sys.modules[m] is not None], "flax imported"
        try:
            import ejkernel_nsa.nnx
        except ImportError as error:
            print(error)
        else:
            raise SystemExit("ejkernel_nsa.nnx imported without flax")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install 'ejkernel-nsa[nnx]'" in result.stdout


# ---- the layer --------------------------------------------------------------------------------


@needs_flax
@pytest.mark.parametrize("heads, kv_heads, window", [(HQ, H, OPTIONS["window_size"]), (3, 1, 0)],
                         ids=["G2-window", "G3-no-window"])
def test_layer_equals_the_composition(heads, kv_heads, window):
    layer = make_layer(num_heads=heads, num_kv_heads=kv_heads, window_size=window)
    assert layer.g_proj.kernel[...].shape == (HIDDEN, heads * (3 if window else 2))
    x = random_x()
    got = call(layer, x)
    want = composition(kernels(layer), x, heads=heads, kv_heads=kv_heads, window_size=window)
    assert got.shape == (B, T, HIDDEN) and got.dtype == jnp.float32
    assert relative_error(got, want) < 1e-5


@needs_flax
def test_gradients_match_the_composition_and_remat():
    layer, x = make_layer(), random_x()
    cotangent = jax.random.normal(jax.random.key(7), (B, T, HIDDEN))

    def layer_loss(model, x):
        return jnp.sum(model(x) * cotangent)

    grads = nnx.jit(nnx.grad(layer_loss, argnums=(0, 1)))(layer, x)
    remat_grads = nnx.jit(nnx.grad(nnx.remat(layer_loss), argnums=(0, 1)))(layer, x)
    want_params, want_x = jax.jit(jax.grad(lambda p, x: jnp.sum(composition(p, x) * cotangent), argnums=(0, 1)))(
        kernels(layer), x)
    for name in want_params:
        for got in (grads[0], remat_grads[0]):
            g = getattr(got, f"{name}_proj").kernel[...]
            assert bool(jnp.all(jnp.isfinite(g))), name
            assert relative_error(g, want_params[name]) < 1e-4, name
    assert relative_error(grads[1], want_x) < 1e-4
    assert relative_error(remat_grads[1], want_x) < 1e-4


@needs_flax
def test_bfloat16_and_nnx_jit():
    layer32, x = make_layer(), random_x()
    layer16 = make_layer(dtype=jnp.bfloat16)  # same seed: the same float32 parameters
    assert layer16.q_proj.kernel[...].dtype == jnp.float32
    want = call(layer32, x)
    got = call(layer16, x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(got.astype(jnp.float32))))
    assert relative_error(got.astype(jnp.float32), want) < 5e-2
    # nnx.jit of a training step: a finite loss that goes down after one step of plain SGD.
    @nnx.jit
    def step(model, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, params, nnx.state(grads, nnx.Param)))
        return loss

    first, second = float(step(layer32, x)), float(step(layer32, x))
    assert np.isfinite(first) and second < first


@needs_flax
def test_padding_mask_equals_each_sequence_alone():
    layer = make_layer()
    x = random_x(batch=2)
    # One left-padded and one right-padded row (a full row is the unmasked case above).
    lengths, left_pad = [37, 61], [True, False]
    mask = np.zeros((2, T), bool)
    for row, (length, left) in enumerate(zip(lengths, left_pad)):
        mask[row] = (np.arange(T) >= T - length) if left else (np.arange(T) < length)
    got = call(layer, x, jnp.asarray(mask))
    for row in range(2):
        alone = call(layer, x[row][mask[row]][None])[0]
        assert relative_error(got[row][mask[row]], alone) < 1e-5, row
        assert not np.any(np.asarray(got[row][~mask[row]])), row


@needs_flax
def test_bad_arguments():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        make_layer(num_heads=6, num_kv_heads=4)
    with pytest.raises(TypeError, match="block_size"):
        make_layer(block_size=16.0)
    with pytest.raises(ValueError, match="rotary_dim"):
        make_layer(rotary_dim=3)
    with pytest.raises(ValueError, match="compress_stride: the stride d=3 must divide"):
        make_layer(compress_block_size=6, compress_stride=3)
    with pytest.raises(TypeError, match="compress_block_size"):
        make_layer(compress_block_size=8.0)
    with pytest.raises(TypeError, match="compressor must be"):
        make_layer(compressor="mlp")
    with pytest.raises(ValueError, match="compressor must be >= 1"):
        make_layer(compressor=0)
    layer = make_layer()
    x = random_x(seq_len=32)
    with pytest.raises(TypeError, match="cache must be"):
        layer(x, cache=object())
    with pytest.raises(ValueError, match="attention_mask: not taken with cache="):
        layer(x, jnp.ones((B, 32), bool), cache=layer.init_cache(B, 64))
    with pytest.raises(ValueError, match="capacity: the capacity must be a multiple of block_size=16"):
        make_layer(compress_block_size=8, compress_stride=4).init_cache(B, 72)
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, jnp.ones((B, 31), bool))
    with pytest.raises(ValueError, match="hidden_size=48"):
        layer(x[..., :40])


# ---- SPEC section 9: the compression geometry and the learned compressor -------------------------

# The paper's shape of geometry at this test's scale: blocks of 8 at stride 4 under selection
# blocks of 16 (overlapping compressed blocks; weights 1/2, 1, 1, 1/2 per selection block).
GEOMETRY = (8, 4)


def make_compressor_layer(seed=0, hidden=16):
    layer = make_layer(seed, compress_block_size=GEOMETRY[0], compress_stride=GEOMETRY[1], compressor=hidden)
    # The compressor starts as mean pooling (its last layer is zero); give that layer random
    # values so that the MLP, and each of its parameters' gradients, matters in the checks.
    keys = jax.random.split(jax.random.key(seed + 100), 4)
    for key, name in zip(keys, ("key_w_out", "key_b_out", "value_w_out", "value_b_out")):
        param = getattr(layer.compressor, name)
        param[...] = 0.3 * jax.random.normal(key, param[...].shape, param[...].dtype)
    return layer


@needs_flax
def test_geometry_equals_the_composition():
    x = random_x()
    layer = make_layer(compress_block_size=GEOMETRY[0], compress_stride=GEOMETRY[1])
    assert layer.compressor is None
    want = composition(kernels(layer), x, geometry=GEOMETRY)
    assert relative_error(call(layer, x), want) < 1e-5
    # The geometry reaches the kernel: disjoint blocks of 16 give another result.
    assert relative_error(composition(kernels(layer), x), want) > 1e-3
    # compressor=True: the documented default width, starting as mean pooling (a zero last layer).
    default = make_layer(compress_block_size=GEOMETRY[0], compress_stride=GEOMETRY[1], compressor=True)
    assert default.compressor.key_w_in[...].shape == (GEOMETRY[0] * D, 4 * D)
    assert not np.any(np.asarray(default.compressor.value_w_out[...]))


@needs_flax
def test_compressor_values_and_gradients_match_the_composition():
    layer, x = make_compressor_layer(), random_x()
    params = layer.compressor.as_dict()
    assert params["key"]["w_in"].shape == (GEOMETRY[0] * D, 16) and params["value"]["position"].shape == (GEOMETRY[0], D)
    cotangent = jax.random.normal(jax.random.key(8), (B, T, HIDDEN))

    def layer_loss(model):
        out = model(x)
        return jnp.sum(out * cotangent), out

    def composition_loss(kernel_params, cmp_params):
        out = composition(kernel_params, x, cmp_params=cmp_params, geometry=GEOMETRY)
        return jnp.sum(out * cotangent), out

    # Values and gradients from one compile each (CI time).
    (_, got), grads = nnx.jit(nnx.value_and_grad(layer_loss, has_aux=True))(layer)
    (_, want), (want_params, want_cmp) = jax.jit(jax.value_and_grad(composition_loss, argnums=(0, 1), has_aux=True))(
        kernels(layer), params)
    assert relative_error(got, want) < 1e-5
    # The compressor reaches the kernel: mean pooling with the same projections gives another result.
    assert relative_error(got, composition(kernels(layer), x, geometry=GEOMETRY)) > 1e-3
    for branch in ("key", "value"):
        for name, want_grad in want_cmp[branch].items():
            got_grad = getattr(grads.compressor, f"{branch}_{name}")[...]
            assert float(jnp.linalg.norm(got_grad)) > 0, (branch, name)
            assert relative_error(got_grad, want_grad) < 1e-4, (branch, name)
    for name in want_params:
        assert relative_error(getattr(grads, f"{name}_proj").kernel[...], want_params[name]) < 1e-4, name


@needs_flax
def test_compressor_with_a_padding_mask_reads_only_each_rows_tokens():
    # NSA is causal, so a row's first n tokens give the first n outputs of the whole row. Row 0 is
    # right-padded to 70 tokens; row 1 holds row 0's first 69 tokens behind 19 of left padding.
    # Both must give row 0's unpadded outputs: in the packed row the compressor's blocks of 8 at
    # stride 4 must not read across the sequences' boundaries (70 and 69 are not multiples of 4),
    # and row 1's positions must count from its first real token. One compile for the masked call.
    layer = make_compressor_layer()
    x = np.array(random_x(batch=2))
    x[1, 19:] = x[0, :69]
    mask = np.stack([np.arange(T) < 70, np.arange(T) >= 19])
    x = jnp.asarray(x)
    got = np.asarray(call(layer, x, jnp.asarray(mask)))
    unpadded = call(layer, x)[0]
    assert relative_error(got[0, :70], unpadded[:70]) < 1e-5
    assert relative_error(got[1, 19:], unpadded[:69]) < 1e-5
    assert not np.any(got[~mask])


# ---- decoding with the cache (SPEC section 10) ---------------------------------------------------


@needs_flax
def test_cache_prefill_and_steps_equal_the_full_sequence():
    # A prompt of 84 tokens as one chunk, then 4 single-token steps: each output equals the
    # full-sequence layer's rows at those positions (rotary at the cache's lengths). Two compiles
    # (the chunk and the step); the full call is the one of the tests above.
    layer, x = make_layer(), random_x()
    full = call(layer, x)
    decode = nnx.jit(lambda layer, x, cache: layer(x, cache=cache))
    cache = layer.init_cache(B, 96)
    prompt = 84
    got, cache = decode(layer, x[:, :prompt], cache)
    assert relative_error(got, full[:, :prompt]) < 1e-5
    for t in range(prompt, T):
        got, cache = decode(layer, x[:, t:t + 1], cache)
        assert relative_error(got[:, 0], full[:, t]) < 1e-5, t
    np.testing.assert_array_equal(cache.lengths, [T, T])


@needs_flax
def test_init_cache_dtype_defaults_to_the_layers_and_is_overridable():
    # An explicit dtype= was once dropped for the layer's own (a bf16 cache of an f32 layer).
    layer = make_layer()
    assert layer.init_cache(B, 64).key.dtype == jnp.float32
    assert make_layer(dtype=jnp.bfloat16).init_cache(B, 64).key.dtype == jnp.bfloat16
    cache = layer.init_cache(B, 64, dtype=jnp.bfloat16)
    assert cache.key.dtype == cache.value.dtype == jnp.bfloat16


@needs_flax
@pytest.mark.parametrize("learned", [False, True], ids=["geometry", "compressor"])
def test_cache_with_geometry_or_compressor_equals_the_full_sequence(learned):
    # SPEC 9's overlapping blocks in the cache, mean-pooled or through the layer's own learned
    # compressor (its parameters read on each call): a prompt of 77 tokens (blocks 8 at stride 4
    # end mid-way), then single steps, equal the full-sequence layer's rows.
    layer = make_compressor_layer() if learned else make_layer(compress_block_size=GEOMETRY[0],
                                                               compress_stride=GEOMETRY[1])
    x = random_x(seed=3)
    full = call(layer, x)
    decode = nnx.jit(lambda layer, x, cache: layer(x, cache=cache))
    cache = layer.init_cache(B, 96)
    assert (cache.compress_block_size, cache.compress_stride, cache.learned_compression) == GEOMETRY + (learned,)
    prompt = 77
    got, cache = decode(layer, x[:, :prompt], cache)
    assert relative_error(got, full[:, :prompt]) < 1e-5
    for t in range(prompt, prompt + 3):
        got, cache = decode(layer, x[:, t:t + 1], cache)
        assert relative_error(got[:, 0], full[:, t]) < 1e-5, t
