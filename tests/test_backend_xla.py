"""The XLA backend against the oracle: the whole shared suite, with chunks of 16 queries so that
the multi-chunk path (and its checkpointed backward) runs even at the suite's small sizes."""

import numpy as np
import pytest
from backend_suite import BackendSuite
from containment import PLANTINGS

from ejkernel_nsa.backends.xla import layout


@pytest.fixture(autouse=True, scope="module")
def small_chunks():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layout, "CHUNK_BYTES", 1)
        yield


class TestXLA(BackendSuite):
    backend = "xla"
    compression_geometry = True
    # SPEC 8: a NaN value and an Inf key at every planting; the gradients at three of them.
    containment_runs = (dict(poisons=(np.nan,), tensors=("value",)), dict(poisons=(np.inf,), tensors=("key",)))
    gradient_containment_runs = (
        dict(poisons=(np.nan,), tensors=("value",), plantings=PLANTINGS[1:3]),
        dict(poisons=(np.inf,), tensors=("key",), plantings=PLANTINGS[3:]),
    )
