"""A user's type checker sees the public signatures (issue 16): the package ships `py.typed`, and
the decorators around the public calls keep their annotated signatures.

The package is laid out as the wheel installs it (pyproject's package-dir mapping and package
data, copied) in a folder on the user's PYTHONPATH, where mypy applies PEP 561: without
`py.typed` it reports `import-untyped`, and a decorator typed `Callable -> Callable` turns
`native_sparse_attention` into `(*Any, **Any) -> Any`, so the wrong calls below pass unnoticed.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="the typing test needs mypy (in the [test] extra)")
pytest.importorskip("flax", reason="the user file uses the NNX layer (pip install 'ejkernel-nsa[nnx]')")

ROOT = Path(__file__).parents[1]

# Lines marked `# error` must be flagged, and only those; `reveal_type` lines are checked below.
USER_FILE = textwrap.dedent('''\
    import jax.numpy as jnp
    from flax import nnx

    from ejkernel_nsa import native_sparse_attention
    from ejkernel_nsa.nnx import NativeSparseAttention

    q, k, g = jnp.zeros((1, 64, 4, 16)), jnp.zeros((1, 64, 2, 16)), jnp.ones((1, 64, 4))
    reveal_type(native_sparse_attention)
    reveal_type(native_sparse_attention(q, k, k, g, g, block_counts=2, block_size=16))
    native_sparse_attention(q, k, k, g, g, block_size="16")  # error
    native_sparse_attention(q, k, k, g, g, bogus=True)  # error

    layer = NativeSparseAttention(64, num_heads=4, num_kv_heads=2, block_size=16, rngs=nnx.Rngs(0))
    x = jnp.zeros((2, 64, 64))
    reveal_type(layer(x))
    reveal_type(layer(x[:, :1], cache=layer.init_cache(2, 64)))
    print(layer(x).shape)
    NativeSparseAttention("64", num_heads=4, rngs=nnx.Rngs(0))  # error
    layer(x, cache="not a cache")  # error
''')


def install_like_the_wheel(site: Path) -> None:
    """Copy each package's modules and package data where pyproject's setuptools table puts them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs, package_data = config["package-dir"], config.get("package-data", {})
    for package in config["packages"]:
        # The longest mapped prefix decides the source folder, as setuptools does.
        prefix = max((p for p in package_dirs if package == p or package.startswith(p + ".")), key=len)
        source = ROOT / package_dirs[prefix] / package.removeprefix(prefix).lstrip(".").replace(".", "/")
        target = site / Path(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for path in [*source.glob("*.py"), *(source / name for name in package_data.get(package, []))]:
            shutil.copy(path, target / path.name)


def test_mypy_sees_the_annotated_public_signatures(tmp_path):
    site, work = tmp_path / "site", tmp_path / "user"
    install_like_the_wheel(site)
    work.mkdir()
    (work / "user.py").write_text(USER_FILE)
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("PYTHONSAFEPATH", None)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"), "user.py"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    output = result.stdout + result.stderr
    assert "import-untyped" not in output and "import-not-found" not in output, output

    revealed = re.findall(r'^user\.py:\d+: note: Revealed type is "(.*)"$', output, re.MULTILINE)
    assert len(revealed) == 4, output
    signature, nsa_out, layer_out, layer_cached = revealed
    assert signature.startswith("def (query: jax._src.basearray.Array, key: jax._src.basearray.Array"), signature
    assert "block_size: int =" in signature and "window_size: int =" in signature, signature
    assert nsa_out == layer_out == "jax._src.basearray.Array", output
    assert layer_cached == "tuple[jax._src.basearray.Array, ejkernel_nsa.cache.NSACache]", output

    flagged = {int(n) for n in re.findall(r"^user\.py:(\d+): error:", output, re.MULTILINE)}
    marked = {i for i, line in enumerate(USER_FILE.splitlines(), 1) if line.endswith("# error")}
    assert flagged == marked, output
