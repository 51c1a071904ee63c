"""The XLA backend against the oracle: the whole shared suite, with chunks of 16 queries so that
the multi-chunk path (and its checkpointed backward) runs even at the suite's small sizes."""

import pytest
from backend_suite import BackendSuite

from ejkernel_nsa.backends.xla import layout


@pytest.fixture(autouse=True, scope="module")
def small_chunks():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layout, "CHUNK_BYTES", 1)
        yield


class TestXLA(BackendSuite):
    backend = "xla"
    compression_geometry = True
