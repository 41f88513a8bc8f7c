"""Process settings of agent and supervisor actors (swarm.runtime.tuning)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from swarm.config import parse_config
from swarm.errors import ConfigError
from swarm.runtime.tuning import tune_process

BASE = {"name": "t",
        "models": {"m": {"provider": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m"}},
        "agents": {"a": {"model": "m"}}, "supervisor": {"entry": "a"}}


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()


def test_gc_threshold_and_freeze_apply_to_the_process(restore_gc: None) -> None:
    cfg = parse_config(BASE | {"process": {"gc_threshold": 12_345}})
    older = gc.get_threshold()[1:]
    tune_process(cfg.process)
    assert gc.get_threshold() == (12_345, *older)
    assert gc.get_freeze_count() > 0


def test_null_keeps_pythons_collector_settings(restore_gc: None) -> None:
    cfg = parse_config(BASE | {"process": {"gc_threshold": None, "gc_freeze": False}})
    before = gc.get_threshold()
    tune_process(cfg.process)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_tiny_threshold_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"process\.gc_threshold"):
        parse_config(BASE | {"process": {"gc_threshold": 5}})
