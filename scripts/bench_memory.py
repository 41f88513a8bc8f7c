"""Long-term memory benchmark: insert throughput, recall latency at 10k and 100k records,
memory per record, and recall@5 on the shipped labelled set.

    python scripts/bench_memory.py [--sizes 10000,100000] [--queries 200] [--embed-texts 2000]

- insert throughput: the real model (the bundled all-MiniLM-L6-v2 on CPU, in process) embedding
  and storing texts in batches, with deduplication on; and the store alone (precomputed vectors)
  with deduplication on and off.
- recall latency: `LanceMemoryStore.search` with a namespace filter (5 of 50 user namespaces plus
  shared), p50 / p99 over `--queries` queries, exact (flat) and after `optimize` builds the
  IVF-HNSW vector index. The scale runs use random unit vectors of the model's size (384): the
  model embeds ~700 short texts a second on these 2-core machines, so 100k real embeddings would
  take minutes; search cost depends on the vector count and size, not on where vectors came from.
- memory per record: bytes on disk per record (Lance files), and resident memory (RSS) growth
  of this process per record while loading and searching.
- recall@5: swarm.memory.evaluate on the 200 facts / 50 questions, real model.

Needs the memory and embed extras.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from swarm.memory.embed import LocalEmbedder
from swarm.memory.evaluate import load_recall_set, recall_at_k
from swarm.memory.longterm import LanceMemoryStore, NewMemory

DIM = 384


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values."""
    return float(np.percentile(np.asarray(values), q))


def du(path: Path) -> int:
    """Bytes under a directory."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def texts_for(n: int) -> list[str]:
    """n distinct, realistic memory texts: the shipped facts, each with a different note."""
    facts = list(load_recall_set().facts.values())
    notes = ["noted in the weekly sync", "confirmed by email", "from the support call",
             "mentioned during onboarding", "per the last retro", "from the CRM record",
             "said in passing", "from the planning doc"]
    return [f"{facts[i % len(facts)]} ({notes[(i // len(facts)) % len(notes)]}, #{i})"
            for i in range(n)]


async def bench_embed_insert(root: Path, n: int) -> None:
    emb = LocalEmbedder()
    await emb.embed(["warm up"])  # model load is not part of the rate
    store = LanceMemoryStore(str(root / "embed"))
    texts = texts_for(n)
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, n, 256):
        chunk = texts[i:i + 256]
        out = await emb.embed(chunk)
        tokens += out.tokens
        await store.add([NewMemory(t, f"user:u{j % 50}") for j, t in enumerate(chunk, i)],
                        out.vectors)
    dt = time.perf_counter() - t0
    print(f"insert, real model + store (dedup on): {n / dt:8.0f} records/s "
          f"({n} texts, {tokens / n:.0f} tokens each, batches of 256)")


async def bench_scale(root: Path, n: int, queries: int, rng: np.random.Generator) -> None:
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    base_rss = proc.memory_info().rss  # the vectors themselves are not the store's
    store = LanceMemoryStore(str(root / f"scale{n}"), index_min_rows=n)
    batch = 5000
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        items = [NewMemory(f"memory number {j} about topic {j % 997}", f"user:u{j % 50}",
                           user=f"u{j % 50}") for j in range(i, min(n, i + batch))]
        await store.add(items, vecs[i:i + batch], dedup=False)
    insert_s = time.perf_counter() - t0
    q = rng.standard_normal((queries, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)

    async def latencies() -> list[float]:
        out = []
        for i in range(queries):
            ns = [f"user:u{(i * 7 + k) % 50}" for k in range(5)] + ["shared"]
            t = time.perf_counter()
            hits = await store.search(q[i], ns, k=5)
            out.append((time.perf_counter() - t) * 1e3)
            assert hits
        return out

    await store.search(q[0], ["shared"], k=5)  # open the table
    flat = await latencies()
    t0 = time.perf_counter()
    await store.optimize(force_index=True)
    index_s = time.perf_counter() - t0
    indexed = await latencies()
    disk = du(root / f"scale{n}")
    rss = proc.memory_info().rss - base_rss
    print(f"{n:>7} records: insert {n / insert_s:8.0f} records/s (store only, no dedup, "
          f"batches of {batch}); index build {index_s:.1f} s")
    print(f"{'':>7}   recall latency flat    p50 {pct(flat, 50):7.2f} ms  "
          f"p99 {pct(flat, 99):7.2f} ms")
    print(f"{'':>7}   recall latency indexed p50 {pct(indexed, 50):7.2f} ms  "
          f"p99 {pct(indexed, 99):7.2f} ms")
    print(f"{'':>7}   memory per record: {disk / n:6.0f} B on disk, "
          f"{max(rss, 0) / n:6.0f} B RSS growth (process RSS {proc.memory_info().rss / 2**20:.0f}"
          f" MiB, {(base_rss - rss0) / 2**20:.0f} MiB of it the test vectors)")
    await store.aclose()


async def bench_dedup_insert(root: Path, rng: np.random.Generator) -> None:
    n = 5000
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for dedup in (False, True):
        store = LanceMemoryStore(str(root / f"dedup{dedup}"))
        await store.add([NewMemory("seed", "user:u0")], vecs[:1])
        t0 = time.perf_counter()
        for i in range(0, n, 500):
            await store.add([NewMemory(f"m{j}", f"user:u{j % 50}") for j in range(i, i + 500)],
                            vecs[i:i + 500], dedup=dedup)
        dt = time.perf_counter() - t0
        print(f"insert, store only, dedup {'on ' if dedup else 'off'}: {n / dt:8.0f} records/s "
              f"({n} records in batches of 500)")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--embed-texts", type=int, default=2000)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    rng = np.random.default_rng(0)
    try:
        print(f"== long-term memory (LanceDB, {DIM}-d vectors), {os.cpu_count()} CPUs")
        result = await recall_at_k(LanceMemoryStore(str(root / "recall")), LocalEmbedder(), k=5)
        r1 = await recall_at_k(LanceMemoryStore(str(root / "recall1")), LocalEmbedder(), k=1)
        print(f"recall@5 on the shipped set (all-MiniLM-L6-v2): {result['recall']:.3f} "
              f"({result['questions']} questions, {result['facts']} facts); "
              f"recall@1 {r1['recall']:.3f}")
        await bench_embed_insert(root, args.embed_texts)
        await bench_dedup_insert(root, rng)
        for n in (int(x) for x in args.sizes.split(",")):
            await bench_scale(root, n, args.queries, rng)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
