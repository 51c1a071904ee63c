"""The `ejkernel-nsa` command: what this machine can run (`info`), NSA on random inputs with its
timing and an accuracy check (`demo`), the cross-backend test suite (`check`), and the benchmark
against the peers (`bench`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ejkernel_nsa
from ejkernel_nsa import config, registry
from ejkernel_nsa import testing

# SPEC section 8: relative L2 error of the output against a float64 reference.
TOLERANCE = {dtype: testing.TOLERANCES[dtype][0] for dtype in ("float32", "bfloat16")}
# The accuracy check recomputes a slice in float64. Causality makes a token prefix independent of
# later tokens, and kv groups never mix, so the slice's outputs equal those of the full run. The
# prefix is long enough (32 blocks of 64) for the top-k selection to have a real choice.
REFERENCE_TOKENS = 2048
REFERENCE_KV_HEADS = 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after `check` belongs to pytest, options included, so argparse never sees it.
    if argv[:1] == ["check"]:
        return check(argv[1:])
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    args = _parser().parse_args(argv)
    return info() if args.command == "info" else demo(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ejkernel-nsa", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="platform, devices, versions and every backend's status")
    commands.add_parser("check", help="each backend against the float64 oracle (--help for its options; --suite "
                                      "[pytest arguments]: the source checkout's test suite)", add_help=False)
    commands.add_parser("bench", help="time NSA against its peers (benchmarks/nsa_bench.py; --help for its options)",
                        add_help=False)
    demo_parser = commands.add_parser("demo", help="NSA on random inputs: plan, timing, accuracy")
    for flag, default, help_text in [
        ("--batch", 1, "batch size B"),
        ("--seq-len", 4096, "sequence length T"),
        ("--heads", 16, "query heads HQ"),
        ("--kv-heads", 2, "key/value heads H (HQ must be a multiple)"),
        ("--head-dim", 64, "head dimension D"),
        ("--block-counts", 16, "selected blocks per token S"),
        ("--block-size", 64, "compression/selection block size BS"),
        ("--window", 256, "sliding window W (0 drops the window branch)"),
        ("--repeats", 5, "timed runs after compilation"),
    ]:
        minimum = 0 if flag == "--window" else 1
        demo_parser.add_argument(flag, type=_int_at_least(minimum), default=default,
                                 help=f"{help_text} (default {default})")
    demo_parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32")
    demo_parser.add_argument("--backend", default=None, help="force a backend (default: automatic choice)")
    return parser


def _int_at_least(minimum: int):
    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return integer


# ---- info --------------------------------------------------------------------------------------


def info() -> int:
    forced, forced_by = config.forced_backend()
    print(f"ejkernel-nsa {ejkernel_nsa.__version__}")
    print(f"platform   {jax.default_backend()}")
    print(f"devices    {', '.join(f'{device} ({device.device_kind})' for device in jax.devices())}")
    print(f"jax        {jax.__version__} (jaxlib {jax.lib.__version__})")
    print(f"interpret  {'on' if config.interpret_enabled() else 'off'} (Pallas backends on CPU; "
          f"{config.INTERPRET_ENV}=1 or ejkernel_nsa.interpret_mode())")
    print(f"forced     {forced + ' (by ' + forced_by + ')' if forced else 'none: automatic choice'}")
    print(f"tuning     {_tuning_summary()}")
    print("\nbackends (best first when priorities tie):")
    for name, reason in registry.backend_status().items():
        print(f"  {name:<14} {'available' if reason is None else 'unavailable: ' + reason}")
        print(f"  {'':<14} {registry.backend_description(name) or '(no description)'}")
        impls = registry.implementations(backend=name)
        priorities = {impl.priority for impl in impls}
        # A piece with a second kernel for SPEC 10's calls only (Triton's decoding step) says so.
        only_some_longer = len({impl.longer_keys for impl in impls}) > 1
        labels = [impl.piece.value + (" (longer keys)" if only_some_longer and impl.longer_keys else "")
                  for impl in impls]
        if len(priorities) == 1:
            pieces = f"{', '.join(labels)} (priority {priorities.pop()})"
        else:
            pieces = ", ".join(f"{label} (priority {impl.priority})" for label, impl in zip(labels, impls))
        print(f"  {'':<14} pieces: {pieces or 'none registered'}")
    return 0


def _tuning_summary() -> str:
    """Which measured backend order the automatic choice reads here (registry/tuning.py)."""
    from ejkernel_nsa.registry import tuning

    path = tuning.table_path()
    if path is None:
        return f"off ({tuning.TUNING_ENV}=off): priorities alone decide"
    try:
        entries = tuning.load_table(path)["entries"]
    except (OSError, ValueError) as error:
        return f"{path}: unreadable: {error}"
    kind = tuning.device_kind(jax.default_backend())
    mine = [e for e in entries if e["device_kind"] == kind]
    return (f"{path}: {len(entries)} measured shape classes, {len(mine)} for this device kind ({kind})"
            + ("" if mine else ": priorities decide"))


# ---- demo --------------------------------------------------------------------------------------


class Progress:
    """Steps on stderr: a live spinner with elapsed seconds on a terminal, plain lines otherwise."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.live = sys.stderr.isatty()

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        self.done += 1
        text = f"[{self.done}/{self.total}] {label}"
        start, stop = time.perf_counter(), threading.Event()
        if self.live:
            spinner = threading.Thread(target=self._spin, args=(text, start, stop), daemon=True)
            spinner.start()
        else:
            print(f"{text} ...", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            stop.set()
            if self.live:
                spinner.join()
                print(f"\r{text}: {time.perf_counter() - start:.1f}s\033[K", file=sys.stderr, flush=True)

    @staticmethod
    def _spin(text: str, start: float, stop: threading.Event) -> None:
        frames = "|/-\\"
        tick = 0
        while not stop.wait(0.1):
            elapsed = time.perf_counter() - start
            print(f"\r{frames[tick % 4]} {text} {elapsed:.1f}s", end="", file=sys.stderr, flush=True)
            tick += 1


def demo(args: argparse.Namespace) -> int:
    dtype = jnp.dtype(args.dtype)
    shape = dict(B=args.batch, T=args.seq_len, HQ=args.heads, H=args.kv_heads, D=args.head_dim)
    options = dict(block_counts=args.block_counts, block_size=args.block_size, window_size=args.window)
    progress = Progress(total=5)

    with progress.step("random inputs"):
        inputs = _random_inputs(jax.random.key(0), dtype, with_window=args.window > 0, **shape)
    try:
        plan = ejkernel_nsa.explain(**inputs, **options, backend=args.backend)
    except (ValueError, TypeError) as error:  # BackendError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"NSA on {jax.default_backend()}: B={args.batch} T={args.seq_len} HQ={args.heads} H={args.kv_heads} "
          f"D={args.head_dim} {args.dtype}, block_size={args.block_size} block_counts={args.block_counts} "
          f"window={args.window}, gates: {', '.join(k for k in inputs if k.startswith('g_'))}")
    print(f"keys the last token attends to: {_keys_at_last_token(args)} (dense causal attention: {args.seq_len})")
    note = _short_sequence_note(args)
    if note:
        print(note)
    print(plan)

    def nsa(inputs):
        return ejkernel_nsa.native_sparse_attention(**inputs, **options, backend=args.backend)

    with progress.step("trace and compile"):
        start = time.perf_counter()
        compiled = jax.jit(nsa).lower(inputs).compile()
        compile_s = time.perf_counter() - start
    times = []
    with progress.step(f"{args.repeats} timed runs"):
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = compiled(inputs).block_until_ready()
            times.append(time.perf_counter() - start)
    print(f"compile: {compile_s:.2f} s   run: {statistics.median(times) * 1e3:.1f} ms "
          f"(median of {args.repeats}, jitted, block_until_ready)")

    tokens, kv_heads = min(REFERENCE_TOKENS, args.seq_len), min(REFERENCE_KV_HEADS, args.kv_heads)
    q_heads = kv_heads * (args.heads // args.kv_heads)
    with progress.step("float64 reference"):
        reference, compared, reference_name = _float64_reference(inputs, options, tokens, kv_heads, q_heads)
    with progress.step("compare"):
        got = np.asarray(out[:1, :tokens, :q_heads].astype(jnp.float32), np.float64)
        error = np.linalg.norm((got - reference)[compared]) / np.linalg.norm(reference[compared])
        finite = bool(jnp.all(jnp.isfinite(out)))
    tolerance = TOLERANCE[args.dtype]
    passed = finite and error < tolerance
    print(f"accuracy: relative L2 error {error:.2e} vs {reference_name} (tolerance {tolerance:.0e}) "
          f"on batch row 0, query heads 0-{q_heads - 1}, tokens 0-{tokens - 1} "
          f"({compared.mean():.0%} of (token, head) pairs: the rest are top-k near ties); "
          f"output finite: {'yes' if finite else 'NO'}: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


def _key_counts(args: argparse.Namespace) -> tuple[int, int, int]:
    """Keys the last token reads per branch: (compressed blocks, selected keys, window keys)."""
    seq_len, block_size = args.seq_len, args.block_size
    selected = min(args.block_counts * block_size, -(-seq_len // block_size) * block_size, seq_len)
    return seq_len // block_size, selected, min(args.window, seq_len)


def _keys_at_last_token(args: argparse.Namespace) -> str:
    """The sparsity NSA buys: compressed blocks + selected blocks + window, instead of every key."""
    compressed, selected, window = _key_counts(args)
    return f"{compressed} compressed + {selected} selected + {window} window = {compressed + selected + window}"


def _short_sequence_note(args: argparse.Namespace) -> str | None:
    """Why NSA can read more keys than dense attention at short T, so the count is not read as a bug."""
    seq_len, block_size = args.seq_len, args.block_size
    compressed, selected, window = _key_counts(args)
    if compressed + selected + window <= seq_len:
        return None
    return (f"note: at T={seq_len} the branches overlap: the {selected} selected keys already cover "
            f"{'every key' if selected >= seq_len else f'{selected} of {seq_len} keys'}, and the window re-reads "
            f"the latest {window}, so NSA reads more than dense attention here. Its saving needs "
            f"T well above block_counts * block_size + window = {args.block_counts * block_size + args.window} "
            f"(try --seq-len {4 * (args.block_counts * block_size + args.window)})")


def _random_inputs(key, dtype, *, B, T, HQ, H, D, with_window) -> dict[str, jax.Array]:
    """Normal queries, keys and values; gates in (0, 1) as a sigmoid would give them."""
    keys = jax.random.split(key, 6)
    inputs = {
        "query": jax.random.normal(keys[0], (B, T, HQ, D)),
        "key": jax.random.normal(keys[1], (B, T, H, D)),
        "value": jax.random.normal(keys[2], (B, T, H, D)),
        "g_cmp": jax.nn.sigmoid(jax.random.normal(keys[3], (B, T, HQ))),
        "g_slc": jax.nn.sigmoid(jax.random.normal(keys[4], (B, T, HQ))),
    }
    if with_window:
        inputs["g_swa"] = jax.nn.sigmoid(jax.random.normal(keys[5], (B, T, HQ)))
    return {name: x.astype(dtype) for name, x in inputs.items()}


def _float64_reference(inputs, options, tokens, kv_heads, q_heads):
    """The demo's slice recomputed by the independent float64 NumPy oracle (ejkernel_nsa.testing).

    Returns the reference output, a mask of the heads to compare (the oracle leaves out heads
    whose top-k is a near tie, which lower precision may legitimately resolve the other way, as
    the tests do), and the reference's name.
    """
    heads = {"query": q_heads, "key": kv_heads, "value": kv_heads}
    sliced = {name: np.asarray(x[:1, :tokens, : heads.get(name, q_heads)].astype(jnp.float32), np.float64)
              for name, x in inputs.items()}
    expected = testing.oracle.nsa_forward(**sliced, **options)
    group = q_heads // kv_heads
    counts = options["block_counts"]
    separated = testing.oracle.near_tie_mask(expected["scores"], counts, counts, group)
    return expected["o"], np.repeat(separated, group, axis=2), f"the float64 NumPy oracle ({testing.oracle.__name__})"


def _source_file(relative: str) -> Path:
    """A file of the source checkout beside the package (tests/, benchmarks/: not in the wheel)."""
    return Path(ejkernel_nsa.__file__).resolve().parent.parent / relative


# ---- check -------------------------------------------------------------------------------------


def check(argv: list[str]) -> int:
    # `--suite` hands everything after it to pytest, options included, so argparse never sees it.
    if argv[:1] == ["--suite"]:
        return _check_suite(argv[1:])
    parser = _check_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # `check` used to hand its arguments to pytest: say where they go now
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (pytest arguments go after --suite: "
                     f"ejkernel-nsa check --suite {' '.join(unknown)})")
    dtypes = args.dtype or ["float32", "bfloat16"]
    selected = [problem for problem in testing.PROBLEMS if args.problem is None or problem.name in args.problem]
    status = registry.backend_status()
    backends = args.backend or [name for name, reason in status.items() if reason is None]
    problems = f"{len(selected)} problem{'s' * (len(selected) > 1)}"
    print(f"cross-backend check: {', '.join(backends)}, each forced on {problems} x {', '.join(dtypes)}: "
          f"output{'' if args.no_gradients else ' and gradients'} against the float64 NumPy oracle "
          f"({testing.oracle.__name__}), SPEC section 8's tolerances")
    for name, reason in status.items():
        if reason is not None and not args.backend:
            print(f"not checked: {name} cannot run here: {reason}")
    outcomes = testing.check_backends(backends, dtypes, selected, gradients=not args.no_gradients, seed=args.seed,
                                      on_outcome=lambda outcome: print(outcome, flush=True))
    counts = {kind: sum(outcome.status == kind for outcome in outcomes) for kind in ("pass", "fail", "declined")}
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['declined']} declined"
          + (" (a declined problem is one the forced backend cannot run, with its reason: not an error)"
             if counts["declined"] else ""))
    if counts["fail"]:
        return 1
    return 0 if counts["pass"] else 2


def _check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ejkernel-nsa check",
        description="Force each backend that runs here on a few NSA problems (one per SPEC feature) and compare "
                    "its output and gradients with the float64 oracle shipped in ejkernel_nsa.testing. "
                    "`ejkernel-nsa check --suite [pytest arguments]` runs the full test suite of a source checkout "
                    "instead.")
    parser.add_argument("--backend", action="append", choices=list(registry.backend_status()),
                        help="check this backend (repeatable; default: every backend that can run here)")
    parser.add_argument("--dtype", action="append", choices=sorted(testing.TOLERANCES),
                        help="input dtype (repeatable; default: float32 and bfloat16)")
    parser.add_argument("--problem", action="append", choices=[problem.name for problem in testing.PROBLEMS],
                        help="run only this problem (repeatable; default: all)")
    parser.add_argument("--no-gradients", action="store_true", help="compare outputs only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    return parser


def _check_suite(pytest_args: list[str]) -> int:
    tests = _source_file("tests")
    if not tests.is_dir():
        print(f"ejkernel-nsa check --suite: no test suite at {tests}: the full suite (hypothesis draws, every "
              "backend's kernels) ships with the source checkout, not the wheel. Clone the repository, "
              "`pip install -e '.[test]'`, and run it there; `ejkernel-nsa check` (no --suite) is the installed "
              "cross-backend check.", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "pytest", str(tests), "-q", *pytest_args])


# ---- bench -------------------------------------------------------------------------------------


def bench(bench_args: list[str]) -> int:
    script = _source_file("benchmarks/nsa_bench.py")
    if not script.is_file():
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        print(f"ejkernel-nsa bench: needs the source checkout's benchmarks/ (benchmarks/nsa_bench.py and its "
              f"bench_*.py modules, not in the wheel; looked for {script}). Clone the repository, "
              "`pip install -e '.[bench,gpu]'` (matplotlib for the plot; the peers fla, ejkernel and torch are "
              "optional and recorded as 'not installed' when missing), and run `ejkernel-nsa bench` there. Its "
              "default plan times GPU kernels and needs an NVIDIA GPU "
              + (f"(here: {gpus[0].device_kind})" if gpus else f"(none here: JAX sees only {jax.default_backend()} "
                 "devices; `--shapes tiny --seq-lens 256 --impls auto,xla` is its CPU check)") + ".",
              file=sys.stderr)
        return 2
    # A fresh process: this one has imported JAX already, and the harness must configure JAX's
    # GPU memory (no preallocation, so the PyTorch peer fits beside it) before JAX starts.
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return subprocess.call([sys.executable, str(script), *bench_args], env=env)


if __name__ == "__main__":
    sys.exit(main())
