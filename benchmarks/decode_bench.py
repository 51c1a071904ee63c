"""Serving benchmark: one NSA decoding step against a KV cache, and chunked prefill (issue 14).

    python benchmarks/decode_bench.py                  # H200 sizes, < 4 min; JSON under results/
    python benchmarks/decode_bench.py --tiny           # CPU-sized smoke run (tests/test_decode_bench.py)

What is timed (jitted, median of the timed runs, host clock around `block_until_ready`):
- `nsa_step`: one decoding step with `ejkernel_nsa.cache`: append the new token (completing its
  compressed block) and attend with its query, the cache donated; rows at the context length.
- `nsa_attend`: the attend call alone (no append).
- `nsa_step_xla`: `nsa_step` with every piece forced onto XLA (on a GPU the automatic choice runs
  the compressed branch, the selected branch and the window in Triton's decoding kernels; the
  JSON's `decode_plan` says which implementation each piece of a step got).
- `dense_cudnn`, `dense_xla`: `jax.nn.dot_product_attention` of the same query over the same cache
  (`key_value_seq_lengths`), with cuDNN and with XLA: dense decoding.
- `nsa_no_cache`: `native_sparse_attention` of the one query against the whole prefix with
  `kv_lengths` but no cache: it compresses the prefix again at every step.
- `nsa_recompute`: the full-sequence call over the prefix (every query, TQ = TK), the cost of
  serving without decoding support; measured at batch 1 and at batch B only where the
  `--recompute-token-limit` allows, else scaled from batch 1 (`"scaled_from_batch_1": true`).
- `prefill_chunk`: `--prefill` tokens appended to a cache of `--prefill-onto - prefill` tokens and
  attended at once (TQ = prefill), against `prefill_full_share`: a full-sequence call at
  `--prefill-onto` tokens times `prefill / prefill-onto` (its rows' share, taking rows as equally
  costly, which slightly favours the full call: later rows read more compressed blocks).

Targets (issue 14) are judged at the end and written to the JSON: at the largest context, batch 1
and batch B, `nsa_step` at least 5x faster than the faster dense decoder and 20x faster than
`nsa_recompute`; `prefill_chunk` within 1.2x of `prefill_full_share`.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp

import ejkernel_nsa
from ejkernel_nsa import cache as kv_cache

GPU = dict(heads=64, kv_heads=4, head_dim=128, block_counts=16, block_size=64, window=512,
           contexts=(8192, 32768, 131072), batches=(1, 64), prefill=2048, prefill_onto=65536,
           recompute_token_limit=1 << 20, dtype="bfloat16")
TINY = dict(heads=4, kv_heads=1, head_dim=16, block_counts=2, block_size=8, window=16,
            contexts=(64, 128), batches=(1, 2), prefill=16, prefill_onto=128,
            recompute_token_limit=1 << 10, dtype="float32")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU-sized problem (a smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="output path (default: results/decode_<device>_<time>.json)")
    parser.add_argument("--png", action="store_true", help="also plot the table (needs matplotlib)")
    parser.add_argument("--contexts", type=int, nargs="*", default=None)
    parser.add_argument("--batches", type=int, nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-case-s", type=float, default=4.0, help="timed seconds per case at most")
    args = parser.parse_args(argv)
    config = dict(TINY if args.tiny else GPU)
    if args.contexts:
        config["contexts"] = tuple(args.contexts)
    if args.batches:
        config["batches"] = tuple(args.batches)
    args.config = config
    return args


def timed(run, state, repeats: int, max_s: float) -> tuple[float, float, object]:
    """(first call s, median ms, final state): `run(state) -> (state, output)`, so that a donated
    cache is threaded from one call to the next."""
    start = time.perf_counter()
    state, out = run(state)
    jax.block_until_ready(out)
    first = time.perf_counter() - start
    times = []
    budget_end = time.perf_counter() + max_s
    for _ in range(repeats):
        start = time.perf_counter()
        state, out = run(state)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() > budget_end and len(times) >= 3:
            break
    return first, statistics.median(times), state


def random_inputs(key, batch, tokens, config, dtype):
    H, HQ, D = config["kv_heads"], config["heads"], config["head_dim"]
    ks = jax.random.split(key, 4)
    q = jax.random.normal(ks[0], (batch, tokens, HQ, D), dtype)
    gates = jax.nn.sigmoid(jax.random.normal(ks[1], (3, batch, tokens, HQ), jnp.float32)).astype(dtype)
    return q, dict(g_cmp=gates[0], g_slc=gates[1], g_swa=gates[2])


def nsa_options(config):
    return dict(block_counts=config["block_counts"], window_size=config["window"])


def filled_cache(key, batch, context, config, dtype):
    """A cache of capacity `context` (rounded up to blocks), rows at length `context - 8`, so
    that timed steps have room to append."""
    H, D, BS = config["kv_heads"], config["head_dim"], config["block_size"]
    capacity = -(-context // BS) * BS
    ks = jax.random.split(key, 2)
    k = jax.random.normal(ks[0], (batch, capacity, H, D), dtype)
    v = jax.random.normal(ks[1], (batch, capacity, H, D), dtype)
    lengths = jnp.full((batch,), context - 8, jnp.int32)
    return kv_cache.from_keys(k, v, lengths, block_size=BS)


def decode_plan(config, dtype, context) -> dict:
    """`{piece: "backend (module)"}` that the automatic choice gives a decoding step at `context`
    (traced with abstract inputs: nothing is allocated), so the record says what was timed."""
    H, HQ, D = config["kv_heads"], config["heads"], config["head_dim"]
    shapes = [jax.ShapeDtypeStruct(s, dtype) for s in ((1, 1, HQ, D), (1, context, H, D), (1, 1, HQ))]
    plans = []

    def trace(q, k, g, lengths):
        plans.append(ejkernel_nsa.explain(q, k, k, g, g, g_swa=g, block_size=config["block_size"],
                                          kv_lengths=lengths, **nsa_options(config)))
        return q

    try:
        jax.eval_shape(trace, *shapes, jax.ShapeDtypeStruct((1,), jnp.int32))
    except Exception as error:  # the record says why instead of ending the run
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    return {piece.value: f"{impl.backend} ({impl.fn.__module__.rsplit('.', 1)[-1]})"
            for piece, impl in plans[0].chosen.items()}


class Skipped(Exception):
    """A baseline that cannot run here (cuDNN without a GPU)."""


class Records(list):
    """The run's records, rewritten to `path` after every one: a run cut short keeps them."""

    def __init__(self, path: Path, header: dict):
        super().__init__()
        self.path, self.header = path, header

    def append(self, record: dict) -> None:
        super().append(record)
        self.save()

    def save(self, **extra) -> None:
        self.path.write_text(json.dumps(dict(self.header, records=list(self), **extra), indent=1))


def run_case(records, name, batch, context, fn, *, repeats, max_s, extra=None):
    record = dict(name=name, batch=batch, context=context, **(extra or {}))
    try:
        first, median, _ = fn(repeats, max_s)
        record.update(status="ok", median_ms=median, first_call_s=first)
        print(f"  {name:<20} B={batch:<3} T={context:<7} {median:9.3f} ms   (first call {first:.1f} s)", flush=True)
    except Skipped as why:
        record.update(status="skipped", error=str(why))
        print(f"  {name:<20} B={batch:<3} T={context:<7} skipped: {why}", flush=True)
    except Exception as error:  # one failing baseline must not end the run: it is recorded
        record.update(status="failed", error=f"{type(error).__name__}: {str(error)[:400]}")
        print(f"  {name:<20} B={batch:<3} T={context:<7} failed: {record['error'][:160]}", flush=True)
        traceback.print_exc(limit=2, file=sys.stderr)
    records.append(record)
    return record


def decode_cases(records, args, config, dtype, batch, context, recompute_batch_1):
    key = jax.random.key(context + batch)
    q, gates = random_inputs(key, batch, 1, config, dtype)
    options = nsa_options(config)
    on_gpu = jax.default_backend() == "gpu"
    knobs = dict(repeats=args.repeats, max_s=args.max_case_s)

    def dense(implementation):
        def fn(repeats, max_s):
            if implementation == "cudnn" and not on_gpu:
                raise Skipped("cuDNN needs a GPU")
            cache = filled_cache(key, batch, context, config, dtype)
            attend = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation=implementation))
            return timed(lambda c: (c, attend(q, c.key, c.value, key_value_seq_lengths=c.lengths)), cache, repeats, max_s)
        return fn

    def attend_only(repeats, max_s):
        cache = filled_cache(key, batch, context, config, dtype)
        attend = jax.jit(lambda c, q, g: kv_cache.attend(c, q, **g, **options))
        return timed(lambda c: (c, attend(c, q, gates)), cache, repeats, max_s)

    def step(repeats, max_s, backend=None):
        cache = filled_cache(key, batch, context, config, dtype)
        token_k = jax.random.normal(key, (batch, 1, config["kv_heads"], config["head_dim"]), dtype)

        @functools.partial(jax.jit, donate_argnums=0)
        def one_step(c, k, q, g):
            c = kv_cache.append(c, k, k)
            return c, kv_cache.attend(c, q, **g, **options, backend=backend)

        # The rows grow by one per step: rewind them so every step runs at the same length.
        rewind = jax.jit(lambda c: kv_cache.NSACache(c.key, c.value, c.key_cmp, c.value_cmp,
                                                     jnp.minimum(c.lengths, context - 1), c.block_size),
                         donate_argnums=0)
        return timed(lambda c: one_step(rewind(c), token_k, q, gates), cache, repeats, max_s)

    def no_cache(repeats, max_s):
        cache = filled_cache(key, batch, context, config, dtype)
        call = jax.jit(lambda k, v, n, q, g: ejkernel_nsa.native_sparse_attention(
            q, k, v, block_size=config["block_size"], kv_lengths=n, **g, **options))
        return timed(lambda c: (c, call(c.key, c.value, c.lengths, q, gates)), cache, repeats, max_s)

    def recompute(batch_used):
        def fn(repeats, max_s):
            ks = jax.random.split(key, 3)
            shape = (batch_used, context, config["kv_heads"], config["head_dim"])
            k, v = jax.random.normal(ks[0], shape, dtype), jax.random.normal(ks[1], shape, dtype)
            q_full, g_full = random_inputs(ks[2], batch_used, context, config, dtype)
            call = jax.jit(lambda q, k, v, g: ejkernel_nsa.native_sparse_attention(
                q, k, v, block_size=config["block_size"], **g, **options))
            return timed(lambda s: (s, call(q_full, k, v, g_full)), None, min(repeats, 5), max_s)
        return fn

    run_case(records, "dense_cudnn", batch, context, dense("cudnn"), **knobs)
    run_case(records, "dense_xla", batch, context, dense("xla"), **knobs)
    run_case(records, "nsa_attend", batch, context, attend_only, **knobs)
    run_case(records, "nsa_step", batch, context, step, **knobs)
    # Every piece on XLA: what the automatic choice (on a GPU, Triton's decoding kernels for the
    # compressed branch, the selected branch and the window) is measured against.
    run_case(records, "nsa_step_xla", batch, context, functools.partial(step, backend="xla"), **knobs)
    run_case(records, "nsa_no_cache", batch, context, no_cache, **knobs)
    if batch * context <= config["recompute_token_limit"]:
        measured = run_case(records, "nsa_recompute", batch, context, recompute(batch), **knobs)
        if batch == 1:
            recompute_batch_1[context] = measured
    elif context in recompute_batch_1 and recompute_batch_1[context].get("status") == "ok":
        scaled = recompute_batch_1[context]["median_ms"] * batch
        records.append(dict(name="nsa_recompute", batch=batch, context=context, status="ok", median_ms=scaled,
                            scaled_from_batch_1=True))
        print(f"  {'nsa_recompute':<20} B={batch:<3} T={context:<7} {scaled:9.3f} ms   (batch 1 x {batch})")


def prefill_cases(records, args, config, dtype):
    onto, chunk = config["prefill_onto"], config["prefill"]
    key = jax.random.key(7)
    options = nsa_options(config)
    q, gates = random_inputs(key, 1, chunk, config, dtype)
    knobs = dict(repeats=min(args.repeats, 10), max_s=args.max_case_s)

    def chunked(repeats, max_s):
        BS = config["block_size"]
        capacity = -(-onto // BS) * BS
        ks = jax.random.split(key, 2)
        shape = (1, capacity, config["kv_heads"], config["head_dim"])
        cache = kv_cache.from_keys(jax.random.normal(ks[0], shape, dtype), jax.random.normal(ks[1], shape, dtype),
                                   jnp.full((1,), onto - chunk, jnp.int32), block_size=BS)
        new_k = jax.random.normal(key, (1, chunk, config["kv_heads"], config["head_dim"]), dtype)

        @functools.partial(jax.jit, donate_argnums=0)
        def prefill(c, k, q, g):
            c = kv_cache.append(c, k, k)
            out = kv_cache.attend(c, q, **g, **options)
            # Rewind, so that every timed call prefills the same rows.
            return kv_cache.NSACache(c.key, c.value, c.key_cmp, c.value_cmp, c.lengths - chunk, c.block_size), out

        return timed(lambda c: prefill(c, new_k, q, gates), cache, repeats, max_s)

    def full(repeats, max_s):
        ks = jax.random.split(key, 3)
        shape = (1, onto, config["kv_heads"], config["head_dim"])
        k, v = jax.random.normal(ks[0], shape, dtype), jax.random.normal(ks[1], shape, dtype)
        q_full, g_full = random_inputs(ks[2], 1, onto, config, dtype)
        call = jax.jit(lambda q, k, v, g: ejkernel_nsa.native_sparse_attention(
            q, k, v, block_size=config["block_size"], **g, **options))
        return timed(lambda s: (s, call(q_full, k, v, g_full)), None, repeats, max_s)

    run_case(records, "prefill_chunk", 1, onto, chunked, extra=dict(prefill=chunk), **knobs)
    whole = run_case(records, "prefill_full", 1, onto, full, **knobs)
    if whole.get("status") == "ok":
        share = whole["median_ms"] * chunk / onto
        records.append(dict(name="prefill_full_share", batch=1, context=onto, prefill=chunk, status="ok",
                            median_ms=share))
        print(f"  {'prefill_full_share':<20} B=1   T={onto:<7} {share:9.3f} ms   ({chunk}/{onto} of the full call)")


def find(records, name, batch, context):
    for record in records:
        if (record["name"], record["batch"], record["context"]) == (name, batch, context) and record["status"] == "ok":
            return record["median_ms"]
    return None


def judge(records, config) -> list[dict]:
    """The issue's targets, each with the numbers it was judged on (None where one is missing)."""
    context = max(config["contexts"])
    verdicts = []
    for batch in config["batches"]:
        step = find(records, "nsa_step", batch, context)
        dense = [t for t in (find(records, "dense_cudnn", batch, context), find(records, "dense_xla", batch, context))
                 if t is not None]
        recompute = find(records, "nsa_recompute", batch, context)
        for target, baseline, factor in (("5x faster than dense decoding", min(dense) if dense else None, 5.0),
                                         ("20x faster than recomputing NSA", recompute, 20.0)):
            speedup = None if step is None or baseline is None else baseline / step
            verdicts.append(dict(target=f"{target} (T={context}, B={batch})", nsa_step_ms=step, baseline_ms=baseline,
                                 speedup=speedup, met=None if speedup is None else speedup >= factor))
    chunk = find(records, "prefill_chunk", 1, config["prefill_onto"])
    share = find(records, "prefill_full_share", 1, config["prefill_onto"])
    ratio = None if chunk is None or share is None else chunk / share
    verdicts.append(dict(target=f"chunked prefill of {config['prefill']} onto {config['prefill_onto']} within 1.2x "
                                "of its rows' share of a full call", prefill_ms=chunk, share_ms=share, ratio=ratio,
                         met=None if ratio is None else ratio <= 1.2))
    return verdicts


def plot(path: Path, records, config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("dense_cudnn", "dense_xla", "nsa_no_cache", "nsa_attend", "nsa_step", "nsa_step_xla")
    fig, axes = plt.subplots(1, len(config["batches"]), figsize=(6 * len(config["batches"]), 4), squeeze=False)
    for ax, batch in zip(axes[0], config["batches"]):
        for name in names:
            points = [(c, find(records, name, batch, c)) for c in config["contexts"]]
            points = [(c, t) for c, t in points if t is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decoding step",
               title=f"batch {batch}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = args.config
    dtype = jnp.dtype(config["dtype"])
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform).replace(" ", "-").lower()
    print(f"NSA decoding on {kind}: HQ={config['heads']} H={config['kv_heads']} D={config['head_dim']} "
          f"S={config['block_counts']} BS={config['block_size']} W={config['window']} {dtype.name}", flush=True)
    start = time.perf_counter()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%MZ")
    path = args.json or Path(__file__).parent / "results" / f"decode_{kind}_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = dict(device_kind=kind, platform=device.platform, jax_version=jax.__version__, config=config,
                  decode_plan=decode_plan(config, dtype, max(config["contexts"])))
    print(f"decoding step's pieces: {header['decode_plan']}", flush=True)
    records = Records(path, header)
    # Batch 1 runs first: its recompute times are scaled for batches too large to recompute. The
    # chunked prefill follows it, so a run cut short still judges that target.
    recompute_batch_1: dict[int, dict] = {}
    batches = sorted(set(config["batches"]) | {1})
    for context in config["contexts"]:
        decode_cases(records, args, config, dtype, 1, context, recompute_batch_1)
    prefill_cases(records, args, config, dtype)
    for batch in batches[1:]:
        for context in config["contexts"]:
            decode_cases(records, args, config, dtype, batch, context, recompute_batch_1)
    verdicts = judge(records, config)
    for verdict in verdicts:
        print(f"target: {verdict['target']}: {'met' if verdict['met'] else 'NOT met' if verdict['met'] is False else 'not measured'}"
              f"  {json.dumps({k: v for k, v in verdict.items() if k not in ('target', 'met')})}")
    records.save(targets=verdicts, wall_s=time.perf_counter() - start)
    print(f"wrote {path} ({time.perf_counter() - start:.0f} s)")
    if args.png:
        plot(path, records, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
