"""Recovery on real multi-process clusters: a lost worker node, and a whole cluster restarted.

Each test runs `scripts/recovery_scenarios.py` in a subprocess, which starts its own Redis and
its own Ray cluster(s) and tears them down; these tests never touch the session's local Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "recovery_scenarios.py"
TIMEOUT_S = 600


def run_scenario(mode: str) -> dict[str, Any]:
    """Run one scenario with --json; return its report, failing with its output if it failed."""
    env = dict(os.environ)
    # The child must start its own clusters, never join the one this pytest session may run.
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), mode, "--json"], cwd=REPO_ROOT, env=env,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"')]
    assert lines, (f"no JSON report (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                   f"{proc.stderr[-4000:]}")
    report: dict[str, Any] = json.loads(lines[-1])
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert proc.returncode == 0 and not failed, (
        f"{mode}: failed checks {failed}, exit {proc.returncode}\n{proc.stdout[-4000:]}\n"
        f"{proc.stderr[-4000:]}")
    return report


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_node_loss_moves_agents_and_charges_exactly_once() -> None:
    report = run_scenario("node-loss")
    checks, figures = report["checks"], report["figures"]
    assert report["ok"] and report["scenario"] == "node-loss"
    for name in ("answers_correct", "steps_as_undisturbed", "balances_20",
                 "effects_exactly_once", "replicas_moved_to_other_worker"):
        assert checks[name], name
    # Tasks on the lost node charged again: the node was noticed dead and replicas moved.
    assert 0 < figures["recovery_ms"] < 60_000


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_cluster_restart_resumes_every_unfinished_task() -> None:
    report = run_scenario("cluster-restart")
    checks, figures = report["checks"], report["figures"]
    assert report["ok"] and report["scenario"] == "cluster-restart"
    for name in ("every_task_in_store", "unfinished_tasks_resumed", "answers_correct",
                 "steps_as_undisturbed", "balances_20", "effects_exactly_once"):
        assert checks[name], name
    # The crash came mid-run: charges had been applied, and tasks were left to resume.
    assert 0 < figures["charges_before_crash"] < 120
    assert figures["tasks_resumed"] == figures["tasks_unfinished_in_store"] > 0
