"""The measured backend order (registry/tuning.json): which entry applies, that it only reorders
the implementations resolve() accepted, and that forcing ignores it (the writer, in
benchmarks/bench_tuning.py, is tested in test_bench.py). A fake device kind and fake tables stand
in for a GPU."""

import json

import numpy as np
import pytest
from fake_backend import install_fake_triton

import ejkernel_nsa as nsa
from ejkernel_nsa.config import BACKEND_ENV
from ejkernel_nsa.problem import Piece
from ejkernel_nsa.registry import KNOWN_BACKENDS, tuning

FAKE_KIND = "FakeGPU 9000"
rng = np.random.default_rng(5)
# G = 2, T = 48, float32: shape class (float32, G=2-15, T<=4k).
q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 48, 4, 16), (1, 48, 2, 16), (1, 48, 2, 16)))
g = rng.uniform(size=(1, 48, 4)).astype(np.float32)
CALL = dict(query=q, key=k, value=v, g_cmp=g, block_counts=2, block_size=16)
CLASS = tuning.ShapeClass("float32", "G=2-15", "T<=4k")


@pytest.fixture(autouse=True)
def fake_device(monkeypatch, tmp_path):
    """This CPU reports FAKE_KIND; the table in use is an empty file under tmp_path."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(tuning, "device_kind", lambda platform: FAKE_KIND)
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(tuning.empty_table()))
    monkeypatch.setenv(tuning.TUNING_ENV, str(path))
    return path


@pytest.fixture
def fake_kernel(monkeypatch):
    """A priority-10 'triton' compressed attention (available here, delegating to XLA) that
    declines Dk > 16."""
    return install_fake_triton(monkeypatch,
                               supports=lambda p: None if p.head_dim <= 16 else f"head_dim {p.head_dim} > 16")


def write_table(path, order, *, kind=FAKE_KIND, shape_class=CLASS, piece=Piece.COMPRESSED_ATTENTION):
    """A table of one entry, written as benchmarks/bench_tuning.py writes them (docs/registry.md)."""
    entry = {"device_kind": kind, "dtype": shape_class.dtype, "group": shape_class.group,
             "seq_len": shape_class.seq_len,
             "pieces": {str(piece): {"order": list(order), "median_ms": {name: 1.0 + i for i, name in enumerate(order)},
                                     "mode": "fwd_bwd", "seq_lens": [48], "source": "test"}}}
    path.write_text(json.dumps(dict(tuning.empty_table(), entries=[entry])))


def test_without_an_entry_priority_decides(fake_kernel):
    plan = nsa.explain(**CALL)
    assert plan.chosen[Piece.COMPRESSED_ATTENTION].backend == "triton"
    assert plan.why[Piece.COMPRESSED_ATTENTION] == "priority 10"
    assert ("xla", "lower priority") in plan.rejected[Piece.COMPRESSED_ATTENTION]


def test_a_measured_order_overrides_priority_and_explain_says_why(fake_kernel, fake_device):
    write_table(fake_device, ["xla", "triton"])
    plan = nsa.explain(**CALL)
    assert plan.chosen[Piece.COMPRESSED_ATTENTION].backend == "xla"
    why = plan.why[Piece.COMPRESSED_ATTENTION]
    assert why.startswith(f"fastest on {FAKE_KIND} per {fake_device}") and "float32, G=2-15, T<=4k" in why
    assert f"fastest on {FAKE_KIND}" in str(plan)
    (reason,) = [r for b, r in plan.rejected[Piece.COMPRESSED_ATTENTION] if b == "triton"]
    assert reason.startswith(f"slower than xla on {FAKE_KIND}") and "triton 2 ms vs xla 1 ms" in reason
    # Pieces without a measurement keep the priority order.
    assert plan.why[Piece.SELECTED_ATTENTION] == "priority 0"
    nsa.native_sparse_attention(**CALL)
    assert not fake_kernel, "the measured-faster backend must be the one that runs"


@pytest.mark.parametrize("other", [
    dict(kind="Another GPU"),
    dict(shape_class=tuning.ShapeClass("bfloat16", "G=2-15", "T<=4k")),
    dict(shape_class=tuning.ShapeClass("float32", "G>=16", "T<=4k")),
    dict(shape_class=tuning.ShapeClass("float32", "G=2-15", "T<=16k")),
    dict(piece=Piece.SELECTED_ATTENTION),
], ids=["device kind", "dtype", "group", "seq len", "piece"])
def test_an_entry_for_another_device_or_shape_class_does_not_apply(fake_kernel, fake_device, other):
    write_table(fake_device, ["xla", "triton"], **other)
    assert nsa.explain(**CALL).chosen[Piece.COMPRESSED_ATTENTION].backend == "triton"


def test_the_order_only_ranks_backends_that_accept_the_call(fake_kernel, fake_device):
    # pallas_mosaic has no implementation in the fake's table; triton declines Dk = 32.
    write_table(fake_device, ["pallas_mosaic", "triton", "xla"])
    assert nsa.explain(**CALL).chosen[Piece.COMPRESSED_ATTENTION].backend == "triton"
    wide = dict(CALL, query=np.tile(q, 2), key=np.tile(k, 2))
    plan = nsa.explain(**wide)
    assert plan.chosen[Piece.COMPRESSED_ATTENTION].backend == "xla"
    assert ("triton", "head_dim 32 > 16") in plan.rejected[Piece.COMPRESSED_ATTENTION]


def test_a_backend_missing_from_the_order_ranks_after_the_measured_ones(fake_kernel, fake_device):
    write_table(fake_device, ["xla"])
    plan = nsa.explain(**CALL)
    assert plan.chosen[Piece.COMPRESSED_ATTENTION].backend == "xla"
    (reason,) = [r for b, r in plan.rejected[Piece.COMPRESSED_ATTENTION] if b == "triton"]
    assert reason.startswith(f"not measured on {FAKE_KIND}")


def test_forcing_ignores_the_table(fake_kernel, fake_device):
    write_table(fake_device, ["xla", "triton"])
    plan = nsa.explain(**{**CALL, "block_counts": 2}, backend="xla")
    assert plan.chosen[Piece.COMPRESSED_ATTENTION].backend == "xla"
    assert "fastest" not in plan.why[Piece.COMPRESSED_ATTENTION]
    k_cmp, v_cmp = nsa.mean_pool(k, v, 16)
    nsa.compressed_attention(q, k_cmp, v_cmp, 16, backend="triton")
    assert fake_kernel


def test_tuning_off_leaves_priorities(fake_kernel, fake_device, monkeypatch):
    write_table(fake_device, ["xla", "triton"])
    monkeypatch.setenv(tuning.TUNING_ENV, "off")
    assert nsa.explain(**CALL).chosen[Piece.COMPRESSED_ATTENTION].backend == "triton"


def test_the_table_is_reread_when_it_changes(fake_kernel, fake_device):
    write_table(fake_device, ["xla", "triton"])
    assert nsa.explain(**CALL).chosen[Piece.COMPRESSED_ATTENTION].backend == "xla"
    write_table(fake_device, ["triton", "xla", "pallas_triton"])
    assert nsa.explain(**CALL).chosen[Piece.COMPRESSED_ATTENTION].backend == "triton"


def test_a_malformed_table_is_an_error_naming_the_file(fake_kernel, fake_device):
    fake_device.write_text(json.dumps({"entries": []}))
    with pytest.raises(ValueError, match="not a tuning table"):
        nsa.explain(**CALL)


@pytest.mark.parametrize("value, buckets, label", [
    (1, tuning.GROUP_BUCKETS, "G=1"), (2, tuning.GROUP_BUCKETS, "G=2-15"), (15, tuning.GROUP_BUCKETS, "G=2-15"),
    (16, tuning.GROUP_BUCKETS, "G>=16"), (4096, tuning.SEQ_LEN_BUCKETS, "T<=4k"),
    (4097, tuning.SEQ_LEN_BUCKETS, "T<=16k"), (65536, tuning.SEQ_LEN_BUCKETS, "T<=64k"),
    (131072, tuning.SEQ_LEN_BUCKETS, "T>64k"),
])
def test_bucket_bounds_are_inclusive(value, buckets, label):
    assert tuning.bucket(value, buckets) == label


def test_the_packaged_table_is_well_formed(monkeypatch):
    monkeypatch.delenv(tuning.TUNING_ENV)
    table = tuning.load_table(tuning.table_path())
    for entry in table["entries"]:
        assert {entry["group"]} <= {label for _, label in tuning.GROUP_BUCKETS}
        assert {entry["seq_len"]} <= {label for _, label in tuning.SEQ_LEN_BUCKETS}
        for piece, measured in entry["pieces"].items():
            assert Piece(piece) and set(measured["order"]) <= set(KNOWN_BACKENDS)
            assert measured["order"] == sorted(measured["median_ms"], key=measured["median_ms"].get)
