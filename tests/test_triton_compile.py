"""Every Triton kernel compiles for Hopper (sm_90), on this machine, without a GPU.

Each kernel module lists the instances its launches use (`compile_specs`); a kernel that does
not compile fails here, in CI, instead of on a user's GPU.
"""

import importlib

import pytest

triton = pytest.importorskip("triton", reason="the test extra installs triton")

MODULES = ("compression", "compressed_attention", "selection", "selected_attention", "sliding_window", "decode",
           "decode_compressed", "decode_window")


def all_specs():
    specs = []
    for name in MODULES:
        module = importlib.import_module(f"ejkernel_nsa.backends.triton.{name}")
        specs += [pytest.param(spec, id=f"{name}:{spec.name}") for spec in module.compile_specs()]
    return specs


@pytest.mark.parametrize("spec", all_specs())
def test_kernel_compiles_for_sm90(spec):
    kernel = spec.compile(arch=90)
    assert kernel.asm["cubin"], "no machine code"
    assert kernel.metadata.shared <= 227 * 1024, f"{kernel.metadata.shared} bytes of shared memory"
