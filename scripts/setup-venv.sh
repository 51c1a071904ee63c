#!/usr/bin/env bash
# Create (once) the repository's .venv with Python 3.12 and install the project, editable, with
# its test extras and Flax (the [nnx] extra: tests/test_nnx.py and the example run in CI). Re-running is cheap: nothing is reinstalled while pyproject.toml and the pins
# below are unchanged (a stamp inside .venv records their hash).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
stamp="$venv/.ejkernel-nsa-installed"
# The GPU machines run these exact versions; pinning them here keeps CPU and GPU runs comparable.
pins=("jax==0.11.2" "jaxlib==0.11.2" "jaxtyping==0.3.11")

say() { echo "setup-venv: $*" >&2; }

# Print the real path of a Python 3.12 interpreter, trying in order: python3.12 on PATH, the
# pyenv shim with PYENV_VERSION set (a pyenv shim of a non-global version fails without it), and
# the pyenv install directory itself.
find_python312() {
  local candidate version
  local -a attempts=("python3.12")
  if command -v pyenv >/dev/null 2>&1; then
    for version in 3.12.1 $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' || true); do
      attempts+=("env PYENV_VERSION=$version python3.12")
    done
  fi
  for candidate in "${HOME}"/.pyenv/versions/3.12*/bin/python3.12; do
    [[ -x "$candidate" ]] && attempts+=("$candidate")
  done
  for candidate in "${attempts[@]}"; do
    # shellcheck disable=SC2086  # each attempt is a small command line, split on purpose
    if $candidate -c 'import sys; assert sys.version_info[:2] == (3, 12); print(sys.executable)' 2>/dev/null; then
      return 0
    fi
  done
  return 1
}

wanted_stamp() {
  { cat "$repo_root/pyproject.toml"; printf '%s\n' "${pins[@]}"; } | sha256sum | cut -d' ' -f1
}

venv_is_312() {
  [[ -x "$venv/bin/python" ]] &&
    "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null
}

if venv_is_312 && [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$(wanted_stamp)" ]]; then
  exit 0
fi

if ! venv_is_312; then
  if ! python312="$(find_python312)"; then
    say "error: Python 3.12 not found (tried python3.12 on PATH, pyenv with PYENV_VERSION=3.12.x," \
        "and ~/.pyenv/versions/3.12*/bin/python3.12). Install Python 3.12 (e.g. 'pyenv install 3.12')" \
        "and run this again."
    exit 1
  fi
  say "creating $venv with $python312"
  rm -rf "$venv"
  "$python312" -m venv "$venv"
fi

say "installing ejkernel-nsa (editable, with the test and nnx extras) into $venv"
"$venv/bin/python" -m pip install -qq --disable-pip-version-check -e "$repo_root[test,nnx]" "${pins[@]}"
wanted_stamp >"$stamp"
say "ready"
