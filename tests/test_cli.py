"""The `ejkernel-nsa` command: info lists every backend with its status, demo checks itself."""

import re

import pytest
from conftest import has_gpu

from ejkernel_nsa import cli, registry


def test_info_lists_every_backend_with_its_status(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    status = registry.backend_status()
    assert re.search(r"^  xla\s+available$", out, re.M)
    assert re.search(r"^tuning\s+\S*tuning\.json: \d+ measured shape classes, \d+ for this device kind", out, re.M)
    for name in ("triton", "pallas_triton", "pallas_mosaic"):
        line = re.search(rf"^  {name}\s+(.*)$", out, re.M).group(1)
        assert line == ("available" if status[name] is None else f"unavailable: {status[name]}")


@pytest.mark.skipif(has_gpu(), reason="the GPU backends are unavailable only without a GPU")
def test_info_on_cpu_gives_reasons_for_the_gpu_backends(capsys):
    cli.main(["info"])
    out = capsys.readouterr().out
    assert re.search(r"^  triton\s+unavailable: jax_triton cannot be imported", out, re.M)
    assert re.search(r"^  pallas_triton\s+unavailable: needs an NVIDIA GPU", out, re.M)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_demo_passes_its_own_accuracy_check(capsys, dtype):
    args = ["demo", "--seq-len", "300", "--heads", "6", "--kv-heads", "2", "--head-dim", "32",
            "--block-counts", "3", "--block-size", "32", "--window", "40", "--repeats", "1", "--dtype", dtype]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "vs the float64 NumPy oracle" in out and out.rstrip().endswith("PASS")


def test_demo_reports_a_forced_backend_that_cannot_run(capsys):
    assert cli.main(["demo", "--seq-len", "64", "--backend", "no-such-backend"]) == 2
    assert "unknown backend 'no-such-backend'" in capsys.readouterr().err


def test_demo_explains_why_nsa_reads_more_keys_than_dense_at_short_sequences():
    import argparse

    def note(seq_len):
        return cli._short_sequence_note(argparse.Namespace(seq_len=seq_len, block_size=64, block_counts=16, window=256))

    # 8 + 512 + 256 = 776 keys against 512 for dense attention: the demo says why.
    assert "the 512 selected keys already cover every key" in note(512)
    assert "block_counts * block_size + window = 1280" in note(512)
    assert note(4096) is None  # 64 + 1024 + 256 < 4096: no note
