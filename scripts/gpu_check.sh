#!/usr/bin/env bash
# GPU check (not run in CI): deploy one vLLM model through swarm (Ray Serve LLM), run a short
# agent workload against it and print tokens/s.
#
#   bash scripts/gpu_check.sh                        # Qwen/Qwen2.5-0.5B-Instruct, TP=1, 8 tasks
#   MODEL=Qwen/Qwen2.5-7B-Instruct TASKS=32 bash scripts/gpu_check.sh
#
# Needs a machine with an NVIDIA GPU and swarm installed with the gpu extra
# (pip install 'swarm[gpu]', i.e. ray[llm] with vLLM). Runs on a private local Ray cluster unless
# RAY_ADDRESS names one. Environment: PYTHON (default: python), MODEL, TASKS (concurrent tasks,
# default 8), MAX_MODEL_LEN (default 8192), TOOL_PARSER (vLLM tool-call parser; hermes suits Qwen).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "gpu_check: no NVIDIA GPU found (nvidia-smi lists none); this check needs one" >&2
    exit 2
fi
if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
    echo "gpu_check: vLLM is not installed for $PY; install the gpu extra: pip install 'swarm[gpu]'" >&2
    exit 2
fi
nvidia-smi -L

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cat > "$WORK/gpu-check.yaml" <<YAML
name: gpu-check
example_task: Echo the word ready.
models:
  small:
    provider: vllm
    model_source: ${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
    model_id: small
    tier: dedicated
    tensor_parallel_size: 1
    max_model_len: ${MAX_MODEL_LEN:-8192}
    engine_kwargs: {enable_auto_tool_choice: true, tool_call_parser: ${TOOL_PARSER:-hermes}}
    client: {timeout_s: 120}
tools:
  util:
    python: [swarm.examples.tools:echo, swarm.examples.tools:word_count]
agents:
  worker:
    model: small
    instructions: >-
      You are a careful assistant. Use the echo tool once on the text you are given and the
      word_count tool once, then answer in one sentence with the echoed text and the count.
    tools: [util]
    max_steps_per_turn: 6
supervisor: {entry: worker}
budgets:
  task: {max_steps: 8, max_wall_s: 300}
state: {store: none}
YAML

SWARM_GPU_CHECK_CONFIG="$WORK/gpu-check.yaml" SWARM_GPU_CHECK_TASKS="${TASKS:-8}" "$PY" - <<'PYTHON'
import os
import time
from concurrent.futures import ThreadPoolExecutor

from swarm.client import SwarmClient
from swarm.config import load_config
from swarm.runtime.deploy import ensure_ray, start_swarm, stop_embedded_store, stop_swarm

cfg = load_config(os.environ["SWARM_GPU_CHECK_CONFIG"])
n = int(os.environ["SWARM_GPU_CHECK_TASKS"])
ensure_ray()
t0 = time.perf_counter()
print(f"deploying {cfg.models['small'].model_source} through Ray Serve LLM ...", flush=True)
sup, _ = start_swarm(cfg, deployment="gpu-check", ready_timeout=1800)
print(f"model and swarm up in {time.perf_counter() - t0:.1f} s", flush=True)
try:
    client = SwarmClient("gpu-check", sup)
    texts = [f"Echo this text: 'gpu check {i}, the quick brown fox'." for i in range(n)]
    start = time.perf_counter()
    handles = [client.submit(t, user="gpu-check") for t in texts]
    with ThreadPoolExecutor(max_workers=n) as pool:
        infos = list(pool.map(lambda h: h.wait(timeout=600), handles))
    wall = time.perf_counter() - start
finally:
    stop_swarm("gpu-check")
    stop_embedded_store("gpu-check")
tin = sum(i.input_tokens for i in infos)
tout = sum(i.output_tokens for i in infos)
calls = sum(i.model_calls for i in infos)
for i in infos:
    print(f"  {i.task_id[:8]} {i.state:<10} steps {i.steps:>2} model calls {i.model_calls:>2} "
          f"tokens in {i.input_tokens:>6} out {i.output_tokens:>5}"
          + (f"  {i.error_class}: {i.error}" if i.error else ""))
done = sum(i.state == "completed" for i in infos)
print(f"{done}/{n} tasks completed in {wall:.2f} s; {calls} model calls")
print(f"output tokens/s: {tout / wall:,.0f}   (input + output tokens/s: {(tin + tout) / wall:,.0f})")
raise SystemExit(0 if done == n else 1)
PYTHON
