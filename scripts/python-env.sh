#!/usr/bin/env bash
# Create (once) the Python environment of the end-to-end suite in tests/python
# and print its python as the last line of stdout:
#
#   PY=$(bash scripts/python-env.sh | tail -n 1)
#   "$PY" -m pytest tests/python -q
#
# Extra requirements files given as arguments (e.g. bench/abc/requirements.txt
# for `make bench`) are installed on top and join the key, so the suite's own
# environment stays as it is and the bench gets one of its own.
#
# The environment lives in the per-user cache, keyed by the requirements file,
# so a pin change builds a new one and an unchanged file reuses the old one:
#   $CACHE/pyenv-<first 12 hex of sha256(tests/python/requirements.txt)>/
# It is a venv; where `python3 -m venv` is unavailable (Debian's system Python
# ships it separately, as python3-venv), the packages go into
# $ENV/site-packages with `pip install --target` and $ENV/bin/python is a
# small wrapper that puts them on PYTHONPATH. Either way the printed path is
# a python that imports the suite's requirements.
#
# Progress and errors go to stderr; the exit status is non-zero on failure.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REQUIREMENTS="$ROOT/tests/python/requirements.txt"
# Installed without their dependencies: the suite uses one small module of
# each (e.g. contextpilot's HTTP client, which needs only requests).
NODEPS="$ROOT/tests/python/requirements-nodeps.txt"
CACHE="${CONTEXTPILOTD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/contextpilotd}"
# What the suite imports; an environment where these fail is rebuilt.
IMPORT_CHECK='import openai, pytest, prometheus_client, httpx, playwright.sync_api'
EXTRA=()
for extra in "$@"; do
  [[ -f "$extra" ]] || { printf '[python-env] error: no requirements file at %s\n' "$extra" >&2; exit 1; }
  EXTRA+=("$(cd "$(dirname "$extra")" && pwd)/$(basename "$extra")")
done
# The bench's extra requirements are numpy and scipy (ContextPilot's library).
[[ ${#EXTRA[@]} -gt 0 ]] && IMPORT_CHECK="$IMPORT_CHECK, numpy, scipy.cluster.hierarchy"

log() { printf '[python-env] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -f "$REQUIREMENTS" ]] || die "no requirements file at $REQUIREMENTS"

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -c1-64
  else
    shasum -a 256 "$1" | cut -c1-64 # macOS
  fi
}

KEY=$( { sha256_of "$REQUIREMENTS"; [[ -f "$NODEPS" ]] && sha256_of "$NODEPS"; for extra in ${EXTRA[@]+"${EXTRA[@]}"}; do sha256_of "$extra"; done; } | sha256sum 2>/dev/null | cut -c1-12 || true)
[[ -n "$KEY" ]] || KEY=$(sha256_of "$REQUIREMENTS" | cut -c1-12)
ENV_DIR="$CACHE/pyenv-$KEY"
STAMP="$ENV_DIR/.contextpilotd-complete"

# Fast path: a finished environment whose python still imports everything
# (its base interpreter may have been upgraded or removed since).
if [[ -f "$STAMP" && -x "$ENV_DIR/bin/python" ]] && "$ENV_DIR/bin/python" -c "$IMPORT_CHECK" 2>/dev/null; then
  echo "$ENV_DIR/bin/python"
  exit 0
fi

# The pins need Python >= 3.11 (openai 3.x depends on httpx2, which does).
find_python() {
  local candidate
  for candidate in ${CONTEXTPILOTD_PYTHON:-} python3 python3.14 python3.13 python3.12 python3.11 python; do
    if command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      # The interpreter itself, not a shim (pyenv, asdf) that resolves it later.
      "$candidate" -c 'import sys; print(sys.executable)'
      return 0
    fi
  done
  return 1
}
PYTHON=$(find_python) || die "the Python suite needs Python >= 3.11 with pip (found: $(python3 --version 2>&1 || echo 'no python3')); install one (macOS: brew install python; Debian: apt-get install python3 python3-pip python3-venv) or point CONTEXTPILOTD_PYTHON at it"

log "building $ENV_DIR with $PYTHON ($("$PYTHON" --version 2>&1))"
mkdir -p "$CACHE"
# Build next to the final place and rename at the end, so an interrupted or
# concurrent run never leaves a half-built environment under the final name.
WORK=$(mktemp -d "$CACHE/pyenv-$KEY.tmp.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

PIP_FLAGS=(--quiet --disable-pip-version-check --no-input -r "$REQUIREMENTS")
for extra in ${EXTRA[@]+"${EXTRA[@]}"}; do PIP_FLAGS+=(-r "$extra"); done
if "$PYTHON" -m venv --prompt "pyenv-$KEY" "$WORK" >/dev/null 2>&1 && [[ -x "$WORK/bin/python" ]]; then
  "$WORK/bin/python" -m pip install "${PIP_FLAGS[@]}" >&2 \
    || die "pip could not install $REQUIREMENTS into the venv $WORK (see pip's output above)"
  if [[ -f "$NODEPS" ]]; then
    "$WORK/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --no-deps -r "$NODEPS" >&2 \
      || die "pip could not install $NODEPS into the venv $WORK"
  fi
else
  log "python venv unavailable; installing with pip --target"
  rm -rf "$WORK"
  mkdir -p "$WORK/bin"
  "$PYTHON" -m pip --version >/dev/null 2>&1 \
    || die "$PYTHON has neither venv nor pip; install python3-venv or python3-pip"
  "$PYTHON" -m pip install "${PIP_FLAGS[@]}" --target "$WORK/site-packages" >&2 \
    || die "pip could not install $REQUIREMENTS into $WORK/site-packages (see pip's output above)"
  if [[ -f "$NODEPS" ]]; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-input --no-deps -r "$NODEPS" \
      --target "$WORK/site-packages" >&2 || die "pip could not install $NODEPS into $WORK/site-packages"
  fi
  # The wrapper finds site-packages relative to itself, so the rename below
  # does not break it.
  cat >"$WORK/bin/python" <<EOF
#!/usr/bin/env bash
# contextpilotd test environment (pip --target): $PYTHON with its packages.
here=\$(cd "\$(dirname "\${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="\$here/site-packages\${PYTHONPATH:+:\$PYTHONPATH}"
exec "$PYTHON" "\$@"
EOF
  chmod +x "$WORK/bin/python"
fi

# The venv's own scripts (activate, pip) name the directory they were made in:
# point them at the final one.
"$PYTHON" - "$WORK" "$ENV_DIR" <<'PY' || die "could not rewrite paths in $WORK"
import os, sys
work, final = sys.argv[1], sys.argv[2]
paths = [os.path.join(work, "pyvenv.cfg")]
bindir = os.path.join(work, "bin")
paths += [os.path.join(bindir, n) for n in os.listdir(bindir)]
for path in paths:
    if os.path.islink(path) or not os.path.isfile(path):
        continue
    with open(path, "rb") as f:
        data = f.read()
    if work.encode() in data:
        with open(path, "wb") as f:
            f.write(data.replace(work.encode(), final.encode()))
PY
touch "$WORK/.contextpilotd-complete"
rm -rf "$ENV_DIR"
if ! mv "$WORK" "$ENV_DIR" 2>/dev/null; then
  # Another run finished first; use its environment if it works.
  [[ -f "$STAMP" ]] || die "could not move $WORK to $ENV_DIR"
fi
trap - EXIT
rm -rf "$WORK"

"$ENV_DIR/bin/python" -c "$IMPORT_CHECK" \
  || die "$ENV_DIR/bin/python cannot import the suite's requirements"
log "ready: $ENV_DIR"
echo "$ENV_DIR/bin/python"
