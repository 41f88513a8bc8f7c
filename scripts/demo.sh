#!/usr/bin/env bash
# README command 1: install swarm and run the demo swarm on a local Ray cluster.
# Extra arguments go to `swarm run` (e.g. --task "...").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m swarm run configs/research.yaml "$@"
