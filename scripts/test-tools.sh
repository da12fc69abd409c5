#!/usr/bin/env bash
# Tools the test suite calls besides Rust and Python: systemd-analyze (the
# generated user unit is verified with it) and ruby (the Homebrew formula is
# syntax-checked), and Chromium (the dashboard is tested in a real browser).
# Installed with apt when missing; idempotent.
set -euo pipefail

need=()
[[ -x /usr/bin/systemd-analyze ]] || need+=(systemd)
command -v ruby >/dev/null 2>&1 || need+=(ruby)
# The dashboard's browser test (tests/python/test_dashboard.py).
[[ -x /usr/bin/chromium ]] || need+=(chromium)
((${#need[@]})) || exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "test-tools: please install: ${need[*]}" >&2
  exit 1
fi
sudo=()
[[ "$(id -u)" -eq 0 ]] || sudo=(sudo)
echo "[test-tools] installing ${need[*]}" >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
