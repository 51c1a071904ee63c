"""The training example runs end to end (a few steps, tiny shapes): CI keeps it from rotting."""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("flax", reason="the example needs flax (pip install 'ejkernel-nsa[nnx]')")
pytest.importorskip("optax", reason="the example needs optax (a dependency of flax)")

EXAMPLE = Path(__file__).parents[1] / "examples" / "associative_recall.py"


def load_example():
    spec = importlib.util.spec_from_file_location("associative_recall", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recall_batches_hide_each_queried_value_after_its_key():
    example = load_example()
    vocab = example.Vocabulary(8, 12, 10)
    tokens, targets, weights = example.recall_batch(np.random.default_rng(5), vocab, 3, 96, pairs=6, queries=5)
    assert tokens.shape == targets.shape == weights.shape == (3, 96)
    np.testing.assert_array_equal(targets[:, :-1], tokens[:, 1:])
    for row in range(3):
        asked = np.flatnonzero(weights[row])
        assert len(asked) == 5 and asked.min() >= 96 - 10
        for t in asked:
            key, value = tokens[row, t], targets[row, t]
            assert vocab.keys[0] <= key < vocab.keys[1] and vocab.values[0] <= value < vocab.values[1]
            # The pair sits earlier in the haystack, exactly once.
            hits = [j for j in range(96 - 10) if tokens[row, j] == key]
            assert len(hits) == 1 and tokens[row, hits[0] + 1] == value


def test_smoke_run_writes_the_curves(tmp_path):
    example = load_example()
    out = tmp_path / "recall.png"
    assert example.main(["--smoke", "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert set(record["results"]) == {"nsa", "window", "dense"}
    for history in record["results"].values():
        assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
    assert "T=64" in record["shape"] and record["device"].startswith(jax.default_backend())
