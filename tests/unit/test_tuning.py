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
    import pyarrow as pa

    before, pool = gc.get_threshold(), pa.default_memory_pool()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()
    pa.set_memory_pool(pool)


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


def test_arrow_buffers_come_from_malloc_unless_told_otherwise(restore_gc: None) -> None:
    import pyarrow as pa

    tune_process(parse_config(BASE).process)
    assert pa.default_memory_pool().backend_name == "system"
    assert pa.array(list(range(1000))).nbytes > 0  # allocations still work
    pa.set_memory_pool(pa.mimalloc_memory_pool())
    kept = pa.default_memory_pool().backend_name
    tune_process(parse_config(BASE | {"process": {"arrow_memory_pool": "default"}}).process)
    assert pa.default_memory_pool().backend_name == kept
    with pytest.raises(ConfigError, match=r"process\.arrow_memory_pool"):
        parse_config(BASE | {"process": {"arrow_memory_pool": "tcmalloc"}})
