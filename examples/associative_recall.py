"""Does NSA learn to select? A tiny language model on associative recall, against window-only and
dense attention.

The task: a sequence of `T` noise tokens hides `--pairs` (key, value) pairs at random places; the
last tokens repeat some of those keys, each followed by its value. The model is trained to
predict every value of that query section, which needs the key's earlier occurrence, usually far
more than the window away. So:
  * dense causal attention can always find it (the upper bound, at O(T^2) cost);
  * window-only attention (NSA's sliding-window branch alone) cannot see it: chance level;
  * NSA must *select* the block that holds the key from the compressed view of the whole past
    (its selected branch reads only `block_counts * block_size` keys), so it succeeds only if the
    compression and the top-k selection learn to point at the right block.

All three are the same two-layer transformer (RMSNorm, attention, MLP), differing only in the
attention: `ejkernel_nsa.nnx.NativeSparseAttention`, `ejkernel_nsa.sliding_window_attention`
with the same projections, or `jax.nn.dot_product_attention`. The script trains each with the same
data and seed, logs with a progress bar (tqdm when installed), and writes a PNG of the loss and
the query accuracy (matplotlib) and a JSON of the curves.

  python examples/associative_recall.py                   # CPU, T=512: a few minutes per model
  python examples/associative_recall.py --smoke           # a few steps of each, for CI
  python examples/associative_recall.py --seq-len 8192 --block-size 64 --block-counts 8 \\
      --window 256 --batch 16 --steps 600                 # one GPU

Needs `pip install 'ejkernel-nsa[nnx]'` (Flax, optax) and, for the figure, matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

try:
    import optax
    from flax import nnx
except ImportError:
    sys.exit("this example needs Flax NNX and optax: pip install 'ejkernel-nsa[nnx]'")

import ejkernel_nsa
from ejkernel_nsa.nnx import NativeSparseAttention
from ejkernel_nsa.rotary import apply_rotary

KINDS = ("nsa", "window", "dense")
LABELS = {"nsa": "NSA (compressed + selected + window)", "window": "window only", "dense": "dense causal"}


# ---- the task ---------------------------------------------------------------------------------


class Vocabulary:
    """Token ids: noise, then keys, then values (disjoint, so a key is never mistaken for noise)."""

    def __init__(self, num_noise: int, num_keys: int, num_values: int):
        self.noise = (0, num_noise)
        self.keys = (num_noise, num_noise + num_keys)
        self.values = (num_noise + num_keys, num_noise + num_keys + num_values)
        self.size = self.values[1]


def recall_batch(rng: np.random.Generator, vocab: Vocabulary, batch: int, seq_len: int, pairs: int,
                 queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(tokens, targets, weights)`, each `[batch, seq_len]`: next-token targets, weight 1 exactly
    at the query keys, whose next token is the value to recall."""
    query_start = seq_len - 2 * queries
    tokens = rng.integers(*vocab.noise, size=(batch, seq_len))
    weights = np.zeros((batch, seq_len), np.float32)
    for row in range(batch):
        keys = rng.choice(np.arange(*vocab.keys), size=pairs, replace=False)
        values = rng.integers(*vocab.values, size=pairs)
        # Pairs at distinct even offsets of the haystack, so two pairs never overlap.
        slots = rng.choice(query_start // 2, size=pairs, replace=False) * 2
        tokens[row, slots], tokens[row, slots + 1] = keys, values
        asked = rng.choice(pairs, size=queries, replace=queries > pairs)
        positions = query_start + 2 * np.arange(queries)
        tokens[row, positions], tokens[row, positions + 1] = keys[asked], values[asked]
        weights[row, positions] = 1.0
    targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), tokens.dtype)], axis=1)
    return tokens.astype(np.int32), targets.astype(np.int32), weights


# ---- the model --------------------------------------------------------------------------------


class BaselineAttention(nnx.Module):
    """The NSA layer's projections and rotary embedding around window-only or dense attention."""

    def __init__(self, kind: str, hidden: int, heads: int, kv_heads: int, head_dim: int, window: int, *,
                 backend: str | None, rngs: nnx.Rngs):
        self.kind, self.heads, self.kv_heads, self.head_dim = kind, heads, kv_heads, head_dim
        self.window, self.backend = window, backend
        self.q_proj = nnx.Linear(hidden, heads * head_dim, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(hidden, kv_heads * head_dim, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(hidden, kv_heads * head_dim, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(heads * head_dim, hidden, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, seq_len, _ = x.shape
        positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
        q = apply_rotary(self.q_proj(x).reshape(batch, seq_len, self.heads, self.head_dim), positions)
        k = apply_rotary(self.k_proj(x).reshape(batch, seq_len, self.kv_heads, self.head_dim), positions)
        v = self.v_proj(x).reshape(batch, seq_len, self.kv_heads, self.head_dim)
        if self.kind == "window":
            out = ejkernel_nsa.sliding_window_attention(q, k, v, self.window, backend=self.backend)
        else:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.reshape(batch, seq_len, self.heads * self.head_dim))


class Block(nnx.Module):
    def __init__(self, attention: nnx.Module, hidden: int, *, rngs: nnx.Rngs):
        self.norm1, self.norm2 = nnx.RMSNorm(hidden, rngs=rngs), nnx.RMSNorm(hidden, rngs=rngs)
        self.attention = attention
        self.up, self.down = nnx.Linear(hidden, 4 * hidden, rngs=rngs), nnx.Linear(4 * hidden, hidden, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
    """Embeddings with a token shift, transformer blocks, a linear head.

    The token shift (each position also embeds the token before it, as RWKV's token shift and the
    short convolutions of flash-linear-attention's models do) binds each value to its key inside
    one position, so a query key finds its value by content alone; what remains to learn is the
    long-range lookup, which is the point of the experiment.
    """

    def __init__(self, kind: str, vocab_size: int, args: argparse.Namespace, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, args.hidden, rngs=rngs)
        self.embed_previous = nnx.Embed(vocab_size, args.hidden, rngs=rngs)
        blocks = []
        for _ in range(args.layers):
            if kind == "nsa":
                attention = NativeSparseAttention(
                    args.hidden, args.heads, args.kv_heads, args.head_dim, block_size=args.block_size,
                    block_counts=args.block_counts, window_size=args.window, backend=args.backend, rngs=rngs)
            else:
                attention = BaselineAttention(kind, args.hidden, args.heads, args.kv_heads, args.head_dim,
                                              args.window, backend=args.backend, rngs=rngs)
            blocks.append(Block(attention, args.hidden, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.norm = nnx.RMSNorm(args.hidden, rngs=rngs)
        self.head = nnx.Linear(args.hidden, vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        previous = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
        x = self.embed(tokens) + self.embed_previous(previous)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def loss_and_accuracy(model: TinyLM, tokens, targets, weights) -> tuple[jax.Array, jax.Array]:
    logits = model(tokens).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    total = jnp.maximum(weights.sum(), 1.0)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return (losses * weights).sum() / total, (correct * weights).sum() / total


@nnx.jit
def train_step(model: TinyLM, optimizer: nnx.Optimizer, tokens, targets, weights):
    (loss, accuracy), grads = nnx.value_and_grad(loss_and_accuracy, has_aux=True)(model, tokens, targets, weights)
    optimizer.update(model, grads)
    return loss, accuracy


evaluate = nnx.jit(loss_and_accuracy)


# ---- training and the figure --------------------------------------------------------------------


def progress_bar(total: int, description: str):
    """tqdm when installed; otherwise a line every tenth of the run."""
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=description, dynamic_ncols=True, leave=True)
    except ImportError:
        return _PlainProgress(total, description)


class _PlainProgress:
    def __init__(self, total: int, description: str):
        self.total, self.description, self.count, self.postfix = total, description, 0, ""
        self.every = max(1, total // 10)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.count % self.every == 0 or self.count == self.total:
            print(f"{self.description}: step {self.count}/{self.total} {self.postfix}", flush=True)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass


def train(kind: str, args: argparse.Namespace, vocab: Vocabulary) -> dict:
    model = TinyLM(kind, vocab.size, args, rngs=nnx.Rngs(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10 + 1), args.steps)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, 0.9, 0.98)),
                              wrt=nnx.Param)
    data = np.random.default_rng(args.seed)  # the same batches for every kind
    eval_batch = recall_batch(np.random.default_rng(args.seed + 1), vocab, args.eval_batch, args.seq_len,
                              args.pairs, args.queries)
    history = {"step": [], "loss": [], "accuracy": [], "eval_step": [], "eval_loss": [], "eval_accuracy": []}
    bar = progress_bar(args.steps, f"{kind:>6}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = recall_batch(data, vocab, args.batch, args.seq_len, args.pairs, args.queries)
        loss, accuracy = train_step(model, optimizer, *batch)
        history["step"].append(step)
        history["loss"].append(float(loss))
        history["accuracy"].append(float(accuracy))
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            eval_loss, eval_accuracy = evaluate(model, *eval_batch)
            history["eval_step"].append(step)
            history["eval_loss"].append(float(eval_loss))
            history["eval_accuracy"].append(float(eval_accuracy))
            bar.set_postfix_str(f"loss {float(eval_loss):.3f} acc {float(eval_accuracy):.1%}")
        bar.update(1)
    bar.close()
    history["seconds"] = time.perf_counter() - start
    if not history["eval_step"]:  # no held-out evaluation (--eval-every 0): report the last batch
        history["eval_step"], history["eval_loss"], history["eval_accuracy"] = (
            [args.steps], history["loss"][-1:], history["accuracy"][-1:])
    return history


def shape_text(args: argparse.Namespace) -> str:
    return (f"T={args.seq_len} B={args.batch} HQ={args.heads} H={args.kv_heads} D={args.head_dim} "
            f"BS={args.block_size} S={args.block_counts} W={args.window} float32")


def device_text() -> str:
    device = jax.devices()[0]
    return f"{device.platform}: {device.device_kind}"


def plot(results: dict[str, dict], args: argparse.Namespace, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no figure"
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (kind, history) in enumerate(results.items()):
        colour = f"C{i}"
        steps, losses = np.array(history["step"]), np.array(history["loss"])
        smooth = max(1, len(losses) // 50)  # a running mean, so the noisy per-batch loss reads
        smoothed = np.convolve(losses, np.ones(smooth) / smooth, mode="valid")
        loss_axis.plot(steps[smooth - 1:], smoothed, color=colour, label=f"{LABELS[kind]} (train)")
        loss_axis.plot(history["eval_step"], history["eval_loss"], "o", color=colour, markersize=3)
        accuracy_axis.plot(history["eval_step"], history["eval_accuracy"], "o-", color=colour, markersize=3,
                           label=f"{LABELS[kind]}: {history['eval_accuracy'][-1]:.1%}")
    chance = 1.0 / (Vocabulary(args.noise, args.keys, args.values).values[1]
                    - Vocabulary(args.noise, args.keys, args.values).values[0])
    accuracy_axis.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.1%})")
    loss_axis.set(xlabel="step", ylabel="cross-entropy at the queried values", yscale="log")
    accuracy_axis.set(xlabel="step", ylabel="recall accuracy (held-out batch)", ylim=(0, 1.02))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Associative recall, {args.layers}-layer LM: {shape_text(args)}; "
                    f"{args.pairs} pairs, {args.queries} queries; {device_text()}", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=16, help="(key, value) pairs hidden in the noise")
    parser.add_argument("--queries", type=int, default=16, help="keys asked at the end")
    parser.add_argument("--noise", type=int, default=16, help="noise vocabulary")
    parser.add_argument("--keys", type=int, default=32, help="key vocabulary")
    parser.add_argument("--values", type=int, default=16, help="value vocabulary")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--block-counts", type=int, default=5,
                        help="selected blocks; 3 of them are forced (the first, previous and current)")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--eval-every", type=int, default=50, help="0: no held-out evaluation")
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, help="force an ejkernel_nsa backend (default: automatic)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="which attentions to train, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("examples/results/associative_recall.png"),
                        help="the figure; the curves go beside it as .json")
    parser.add_argument("--smoke", action="store_true",
                        help="two steps at T=64 without held-out evaluation (checks that it runs; learns nothing)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.seq_len, args.batch, args.eval_every = 2, 64, 2, 0
        args.pairs, args.queries, args.hidden, args.layers = 4, 4, 32, 1
    kinds = tuple(args.kinds.split(","))
    if not kinds or any(kind not in KINDS for kind in kinds):
        parser.error(f"--kinds must be a comma-separated subset of {','.join(KINDS)}, got {args.kinds!r}")
    args.kinds = kinds
    if 2 * args.queries + 2 * args.pairs > args.seq_len:
        parser.error("--seq-len is too short for the pairs and queries")
    if args.pairs < 1 or args.queries < 1:
        parser.error("--pairs and --queries must be >= 1")
    if args.pairs > args.keys:
        parser.error("--pairs must be <= --keys (each pair has its own key)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    vocab = Vocabulary(args.noise, args.keys, args.values)
    print(f"associative recall on {device_text()}: {shape_text(args)}, {args.layers} layers, hidden {args.hidden}, "
          f"{args.steps} steps; keys the last token reads: NSA {args.seq_len // args.block_size} compressed + "
          f"{min(args.block_counts * args.block_size, args.seq_len)} selected + {args.window} window, "
          f"window-only {args.window}, dense {args.seq_len}", flush=True)
    results = {kind: train(kind, args, vocab) for kind in args.kinds}
    print("final (held-out batch): " + "; ".join(
        f"{kind}: loss {h['eval_loss'][-1]:.3f}, accuracy {h['eval_accuracy'][-1]:.1%} ({h['seconds']:.0f} s)"
        for kind, h in results.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"shape": shape_text(args), "device": device_text(), "args": {k: str(v) for k, v in vars(args).items()},
              "results": results}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    problem = plot(results, args, args.out)
    print(problem or f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
