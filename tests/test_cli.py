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


# ---- check and bench from an installed wheel ----------------------------------------------------
# A wheel has ejkernel_nsa but no tests/ or benchmarks/ beside it: `_source_file` pointed at an empty
# folder stands in for that layout.

WHEEL_LAYOUT = """
import sys
from pathlib import Path
from ejkernel_nsa import cli
cli._source_file = lambda relative: Path({empty!r}) / relative
code = cli.main({argv!r})
tests = {tests!r}
from_tests = sorted(name for name, module in list(sys.modules.items())
                    if (getattr(module, "__file__", None) or "").startswith(tests))
print("modules from tests/:", from_tests or "none")
print("test frameworks loaded:", sorted({{"pytest", "hypothesis"}} & set(sys.modules)) or "none")
sys.exit(code)
"""


def test_check_runs_without_the_test_suite_on_the_packaged_oracle(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    argv = ["check", "--backend", "xla", "--problem", "given-indices", "--dtype", "float32"]
    script = WHEEL_LAYOUT.format(empty=str(tmp_path), argv=argv, tests=str(Path(__file__).resolve().parent))
    # A fresh interpreter started elsewhere: conftest's sys.path entry for tests/ is not there.
    env = dict(os.environ, PYTHONSAFEPATH="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "against the float64 NumPy oracle (ejkernel_nsa.testing.oracle)" in out
    assert re.search(r"^xla +float32 +given-indices +PASS +output \S+ \(tol 1e-04\), gradients \S+ \(tol 1e-03\)$",
                     out, re.M), out
    assert "1 passed, 0 failed, 0 declined" in out
    assert "modules from tests/: none" in out
    assert "test frameworks loaded: none" in out  # a wheel installed without the [test] extra has neither


def test_check_fails_a_backend_whose_output_is_off(monkeypatch):
    import ejkernel_nsa as nsa
    from ejkernel_nsa import testing

    real = nsa.native_sparse_attention
    # 1% too large: far over float32's 1e-4, and it scales every gradient too.
    monkeypatch.setattr(nsa, "native_sparse_attention", lambda *args, **kwargs: real(*args, **kwargs) * 1.01)
    problem = next(p for p in testing.PROBLEMS if p.name == "given-indices")
    (outcome,) = testing.check_backends(["xla"], ["float32"], [problem])
    assert outcome.status == "fail" and not outcome.passed
    assert 9e-3 < outcome.errors["output"] < 1.1e-2
    assert "over tolerance: output" in outcome.detail and "dquery" in outcome.detail


def test_check_reports_a_backend_without_a_needed_piece_as_declined(monkeypatch):
    from fake_backend import install_fake_triton

    from ejkernel_nsa import testing

    install_fake_triton(monkeypatch)  # a 'triton' with compressed attention alone
    problem = next(p for p in testing.PROBLEMS if p.name == "gqa")
    (outcome,) = testing.check_backends(["triton"], ["float32"], [problem], gradients=False)
    assert outcome.status == "declined" and outcome.errors == {}
    assert "triton" in outcome.detail and "compression" in outcome.detail


def test_check_suite_and_bench_from_a_wheel_say_what_they_need(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_source_file", lambda relative: tmp_path / relative)
    assert cli.main(["check", "--suite", "-x"]) == 2
    err = capsys.readouterr().err
    assert f"no test suite at {tmp_path / 'tests'}" in err and "`ejkernel-nsa check` (no --suite)" in err
    assert cli.main(["bench", "--help"]) == 2
    err = capsys.readouterr().err
    assert "needs the source checkout's benchmarks/ (benchmarks/nsa_bench.py" in err
    assert f"looked for {tmp_path / 'benchmarks/nsa_bench.py'}" in err
    assert "needs an NVIDIA GPU" in err
    if not has_gpu():
        assert "none here: JAX sees only cpu devices" in err


def test_check_points_pytest_arguments_to_suite(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check", "-x", "-k", "errors"])
    assert exit_info.value.code == 2
    assert "pytest arguments go after --suite: ejkernel-nsa check --suite -x -k errors" in capsys.readouterr().err
