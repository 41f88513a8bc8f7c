#!/usr/bin/env bash
# README command 2: install swarm with its test dependencies, lint, and run the test suite.
# Extra arguments go to pytest (e.g. -k config, or tests/unit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test memory embed
export PATH="$PWD/.venv/bin:$PATH"
# Tests start their own Ray cluster; never join one that happens to run on this machine.
unset RAY_ADDRESS
echo "== ruff"
.venv/bin/ruff check swarm tests scripts
echo "== pytest"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$code"
