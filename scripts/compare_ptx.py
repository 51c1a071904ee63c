#!/usr/bin/env python
"""Does a change to the Triton kernels change the code they compile to? Compile every kernel spec
that tests/test_triton_compile.py compiles (each module's `compile_specs()`, for sm_90, no GPU
needed) at a base revision and in the working tree, and compare the PTX, and where the PTX
differs, the machine code (SASS, from the cubin by Triton's own `cuobjdump`).

What a refactor may change without changing the machine code is left out of the comparison:
comments, debug line records (`.loc`, `.file`, the `$L__tmp` labels they hang on, the DWARF
sections). Everything else (every instruction, register count, shared-memory size) must match
for a spec to read "identical". Otherwise it reads:
- "PTX differs, SASS identical": the same instructions in another order (Triton evaluates a
  call's keyword arguments before its positional ones, so moving a `tl.load` into a helper can
  move its mask's computation), which ptxas schedules into the same machine code;
- "same PTX, SASS differs": ptxas's register allocation and scheduling
  follow the debug line table too (Triton compiles with line info by default), so code that
  moves within a file, even by one comment line, can flip a kernel between equivalent SASS
  variants. `--no-line-info` compiles both sides without it. Some kernels' SASS varies even
  between two ptxas runs of one PTX file (ptxas 12.8 on the float32 compressed-attention
  kernels: 2 or 3 variants in 6 runs), so for those only the PTX can be compared;
- "DIFFERS": the code changed.
SASS is compared without addresses and encodings.

    scripts/compare_ptx.py --base main                      # base revision against the working tree
    scripts/compare_ptx.py --base main --module sliding_window --show 40
    scripts/compare_ptx.py --base main --no-line-info --match fwd_float32 dq_bf   # only these specs
    scripts/compare_ptx.py dump OUT.json                    # this tree's normalized PTX, for later
    scripts/compare_ptx.py diff BEFORE.json AFTER.json

The base revision is exported with `git archive` into a temporary folder (no worktree, nothing
checked out) and compiled in a child process, so the two versions never share an import. Each
side compiles into its own fresh Triton cache: nothing is read from an earlier compile.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The modules tests/test_triton_compile.py compiles, in its order.
MODULES = ("compression", "compressed_attention", "selection", "selected_attention", "sliding_window", "decode",
           "decode_compressed", "decode_window")
# pyproject.toml's package-dir: the repository's folders as the one installed package.
PACKAGE_DIRS = {"ejkernel_nsa": None, "backends": "backends", "registry": "registry"}

_DEBUG_LABEL = re.compile(r"^\$L__(tmp|func_begin|func_end|debug)\w*:$")
_SASS_NOISE = re.compile(r"/\*[^*]*\*/")


def normalize_ptx(ptx: str) -> str:
    """PTX less what only debug info and comments put there."""
    out = []
    for line in ptx.splitlines():
        if line.lstrip().startswith(".section") and ".debug" in line:
            break  # the DWARF sections close the module; nothing executable follows them
        code = line.split("//", 1)[0].rstrip()
        stripped = code.strip()
        if not stripped or stripped.startswith((".loc", ".file")) or _DEBUG_LABEL.match(stripped):
            continue
        out.append(code)
    return "\n".join(out) + "\n"


def sass(cubin: bytes) -> str:
    """The machine code of a cubin, one instruction a line, without addresses and encodings."""
    from triton import knobs  # the cuobjdump that ships with Triton's ptxas

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", file.name], check=True, capture_output=True,
                                 text=True).stdout
    lines = (_SASS_NOISE.sub("", line).strip() for line in listing.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("/*")) + "\n"


def dump(path: Path, modules, match=None) -> None:
    """Compile every spec of `modules` from whatever `ejkernel_nsa` imports here; write
    `{spec: {ptx, sass, shared}}` as JSON."""
    results = {}
    for name in modules:
        module = importlib.import_module(f"ejkernel_nsa.backends.triton.{name}")
        for spec in module.compile_specs():
            if match and not any(part in f"{name}:{spec.name}" for part in match):
                continue
            kernel = spec.compile()
            results[f"{name}:{spec.name}"] = {
                "ptx": normalize_ptx(kernel.asm["ptx"]), "sass": sass(kernel.asm["cubin"]),
                "shared": kernel.metadata.shared}
            print(f"compiled {name}:{spec.name}", file=sys.stderr, flush=True)
    path.write_text(json.dumps(results, indent=0, sort_keys=True))


def _package_view(source: Path, into: Path) -> Path:
    """A folder whose `ejkernel_nsa` is `source`'s package laid out as pyproject.toml installs it."""
    package = into / "ejkernel_nsa"
    package.mkdir(parents=True)
    for entry in (source / "ejkernel_nsa").iterdir():
        (package / entry.name).symlink_to(entry)
    (package / "backends").symlink_to(source / "backends")
    (package / "registry").symlink_to(source / "registry")
    return into


def _dump_in_child(source: Path, out: Path, modules, scratch: Path, match, line_info: bool) -> None:
    view = _package_view(source, scratch / "view")
    env = dict(os.environ, PYTHONPATH=str(view), PYTHONSAFEPATH="1", TRITON_CACHE_DIR=str(scratch / "triton-cache"))
    env.pop("TRITON_INTERPRET", None)
    if not line_info:
        env["TRITON_DISABLE_LINE_INFO"] = "1"
    command = [sys.executable, str(Path(__file__).resolve()), "dump", str(out), "--module", *modules]
    subprocess.run(command + (["--match", *match] if match else []), env=env, check=True)


def _export(revision: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def diff(before: dict, after: dict, show: int) -> int:
    """Print one line per spec; return how many compile to different machine code (a spec on one
    side only counts)."""
    changed = reordered = line_info = 0
    for name in sorted(set(before) | set(after)):
        if name not in before or name not in after:
            print(f"{name}: only {'after' if name in after else 'before'}")
            changed += 1
            continue
        a, b = before[name], after[name]
        if a == b:
            print(f"{name}: identical ({a['ptx'].count(chr(10))} PTX lines)")
            continue
        lines = list(difflib.unified_diff(a["ptx"].splitlines(), b["ptx"].splitlines(), "before", "after",
                                          lineterm="", n=1))
        body = [line for line in lines[2:] if line[:1] in "+-"]
        if not body:
            line_info += 1
            print(f"{name}: same PTX, SASS differs (ptxas: the line info, or run to run; see the docstring)")
            continue
        if a["sass"] == b["sass"] and a["shared"] == b["shared"]:
            reordered += 1
            print(f"{name}: PTX differs ({len(body)} lines added or removed), SASS identical "
                  f"({a['sass'].count(chr(10))} instructions)")
        else:
            changed += 1
            shared = "" if a["shared"] == b["shared"] else f", shared memory {a['shared']} -> {b['shared']} bytes"
            print(f"{name}: DIFFERS, {len(body)} PTX lines added or removed{shared}")
        for line in lines[:show]:
            print("    " + line)
    total = len(set(before) | set(after))
    print(f"{total - changed - reordered - line_info} identical, {reordered} PTX reordered with identical SASS, "
          f"{line_info} same PTX with SASS differing, {changed} differ")
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", nargs="*",
                        help="nothing (compare --base against the tree), `dump OUT`, or `diff A B`")
    parser.add_argument("--base", help="git revision to compare the working tree against")
    parser.add_argument("--module", nargs="+", default=list(MODULES), choices=MODULES)
    parser.add_argument("--match", nargs="+", help="only the specs whose `module:name` contains one of these")
    parser.add_argument("--no-line-info", action="store_true",
                        help="compile without debug line info (TRITON_DISABLE_LINE_INFO=1), which ptxas also reads")
    parser.add_argument("--show", type=int, default=0, help="print the first N lines of each differing diff")
    args = parser.parse_args(argv)

    if args.action[:1] == ["dump"]:
        dump(Path(args.action[1]), args.module, args.match)
        return 0
    if args.action[:1] == ["diff"]:
        before, after = (json.loads(Path(p).read_text()) for p in args.action[1:3])
        return 1 if diff(before, after, args.show) else 0
    if not args.base:
        parser.error("give --base REV, or `dump OUT` / `diff A B`")
    with tempfile.TemporaryDirectory(prefix="compare_ptx_") as tmp:
        tmp = Path(tmp)
        sides = {}
        for side, source in (("before", _export(args.base, tmp / "base-src")), ("after", REPO)):
            out = tmp / f"{side}.json"
            print(f"== compiling {side} ({args.base if side == 'before' else 'working tree'})", file=sys.stderr)
            _dump_in_child(source, out, args.module, tmp / side, args.match, not args.no_line_info)
            sides[side] = json.loads(out.read_text())
        return 1 if diff(sides["before"], sides["after"], args.show) else 0


if __name__ == "__main__":
    sys.exit(main())
