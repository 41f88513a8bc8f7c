"""Process settings for the actors that run the swarm's hot path.

CPython's cyclic garbage collector runs a young-generation pass after every 700 net container
allocations, and a step allocates thousands (messages, events, spans, log entries). With a
thousand sessions in one agent replica, the collector took about a quarter of the process's
CPU in `scripts/bench_suite.py`'s concurrency workload; the passes find almost nothing, since
the runtime's data is freed by reference counting. A higher first threshold, and objects from
start-up moved out of the collector's view (`gc.freeze`), cut that to a few percent.

A pass walks the young objects still alive, and it stalls every session of the process while
it runs: at a threshold of 50,000 a replica of the 2,000-session workload made two or three
passes of 12-53 ms in a run. At 200,000 (the default) more of a pass's objects have died by
the time it runs; in alternating runs the workload went from 41% to 44% of ideal with it.

Arrow's buffers come from the process's malloc (`process.arrow_memory_pool: system`): pyarrow's
default allocator sets aside megabytes for each thread that writes Parquet, which a replica's
resident memory keeps.
"""

from __future__ import annotations

import gc

from swarm.config import ProcessConfig


def tune_process(proc: ProcessConfig) -> None:
    """Apply a config's `process` settings to this process (an agent or supervisor actor)."""
    if proc.gc_freeze:
        # Everything allocated so far (modules, config, clients) is long-lived: full
        # collections needn't walk it again.
        gc.freeze()
    if proc.gc_threshold is not None:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(proc.gc_threshold, older, oldest)
    if proc.arrow_memory_pool == "system":
        import pyarrow as pa

        # Buffers made before keep their own pool; new ones come from malloc.
        pa.set_memory_pool(pa.system_memory_pool())
