#!/usr/bin/env bash
# Creates .venv (Python 3.11+) and installs swarm into it, with extras given as arguments
# (e.g. `scripts/setup.sh test`). Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY="$cand"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: need Python 3.11 or newer on PATH (or set PYTHON)" >&2; exit 2; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
# The python_exec sandbox needs bubblewrap; as root with apt (CI), install it when missing.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing bubblewrap for the python_exec sandbox" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq bubblewrap >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null; } ||
      echo "setup: could not install bubblewrap; python_exec sandbox tests will fail" \
        "or be skipped" >&2
  else
    echo "setup: bwrap not found; python_exec sandbox tests will be skipped" \
      "(install the bubblewrap package)" >&2
  fi
fi
spec="."
if [ "$#" -gt 0 ]; then spec=".[$(IFS=,; echo "$*")]"; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
# The test suite runs third-party MCP servers from npm (pinned in tests/npm/package-lock.json).
case " $* " in
  *" test "*)
    if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
      # npm ci starts from scratch each time: run it only when the lock file changed.
      if ! cmp -s tests/npm/package-lock.json tests/npm/node_modules/.swarm-installed-lock; then
        echo "setup: installing the npm MCP servers the tests use (tests/npm)" >&2
        if npm ci --prefix tests/npm --no-audit --no-fund --loglevel=error </dev/null; then
          cp tests/npm/package-lock.json tests/npm/node_modules/.swarm-installed-lock
        else
          echo "setup: npm ci failed; the tests against npm MCP servers will be skipped" >&2
        fi
      fi
    else
      echo "setup: node/npm not found; the tests against npm MCP servers will be skipped" >&2
    fi
    ;;
esac
