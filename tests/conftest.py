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

# The test helpers (oracle, cases, backend_suite) are plain modules beside this file.
sys.path.insert(0, str(Path(__file__).parent))

common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=20, print_blob=True, **common)
settings.register_profile("dev", max_examples=25, print_blob=True, **common)
settings.register_profile("thorough", max_examples=300, **common)
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
