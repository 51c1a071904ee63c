"""Hypothesis profiles and the `gpu` marker.

Profiles (select with HYPOTHESIS_PROFILE): `ci` keeps `.ci/run` well under 15 minutes on a 2-core
CPU; `dev` (the default) draws a few more; `thorough` is for a long run before a release.
"""

import os
import sys
from pathlib import Path

import jax
import pytest
from hypothesis import HealthCheck, settings

# The test helpers (cases, backend_suite, ...) are plain modules beside this file; the oracle ships
# in the package (ejkernel_nsa.testing).
sys.path.insert(0, str(Path(__file__).parent))

# Interpreted kernels (EJKERNEL_NSA_INTERPRET=1, no GPU) are orders of magnitude slower: they
# draw a quarter of the examples.
INTERPRETED_RUN = os.environ.get("EJKERNEL_NSA_INTERPRET", "") == "1"
# differing_executors: every kernel backend's test class subclasses one `BackendSuite`, so when two
# of them run in one session (the interpreted pass), hypothesis sees one test method called with
# two `self`s. They share the example database, which only replays one backend's failures on the
# other: wanted.
common = dict(deadline=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors])
for name, examples in {"quick": 6, "ci": 20, "dev": 25, "thorough": 300}.items():
    settings.register_profile(name, max_examples=max(3, examples // 4) if INTERPRETED_RUN else examples, **common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
