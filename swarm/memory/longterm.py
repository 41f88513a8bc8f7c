"""Long-term memory: records with embeddings in a LanceDB table.

LanceDB is embedded (no server), stores Lance files (Arrow-native columnar) and runs on a local
directory or on object storage (`s3://bucket/prefix`, `gs://`, `az://`). One table holds every
namespace; a namespace is a column, and every search filters on it before ranking, so a search
never sees a namespace it was not given. Namespaces are `user:<user>`, `swarm:<swarm>` and
`shared` (see `namespace_for`).

A record: id, text, namespace, user (who it came from), swarm, agent, source_task, metadata
(JSON text), created, updated (epoch seconds) and the vector (float32, unit length, so cosine
similarity is 1 - the cosine distance LanceDB reports).

Writes deduplicate: a new text whose nearest neighbour in the same namespace has cosine
similarity >= the threshold updates that record (text, vector, metadata, updated) instead of
adding a near copy; within one batch, later near copies of an earlier item fold into it. All
writes of a batch are one `merge_insert` (one commit).

Searches are exact (flat) until `optimize` builds a vector index (IVF-HNSW with scalar
quantisation) past `index_min_rows`; rows added after it are still searched, flat, until the next
`optimize`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

MEMORY_EXTRA = "pip install 'swarm[memory]' (lancedb)"
_COLUMNS = ("id", "text", "namespace", "user", "swarm", "agent", "source_task", "metadata",
            "created", "updated")


def namespace_for(scope: str, *, user: str, swarm: str) -> str:
    """The namespace a scope means for a user of a swarm."""
    if scope == "user":
        return f"user:{user}"
    if scope == "swarm":
        return f"swarm:{swarm}"
    if scope == "shared":
        return "shared"
    raise ValueError(f"unknown memory scope {scope!r}; expected user, swarm or shared")


def sql_str(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


@dataclass(slots=True)
class NewMemory:
    """A memory to write (before it has an id)."""

    text: str
    namespace: str
    user: str = ""
    swarm: str = ""
    agent: str = ""
    source_task: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Hit:
    """A memory a search found, with its cosine similarity to the query."""

    id: str
    text: str
    namespace: str
    score: float
    user: str = ""
    agent: str = ""
    source_task: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0

    def public(self) -> dict[str, Any]:
        """The hit as a JSON-able dict (what the recall tool returns)."""
        return {"id": self.id, "text": self.text, "namespace": self.namespace,
                "score": round(self.score, 4), "metadata": self.metadata,
                "source_task": self.source_task, "created": self.created}


def _schema(dim: int) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("text", pa.string()), ("namespace", pa.string()),
        ("user", pa.string()), ("swarm", pa.string()), ("agent", pa.string()),
        ("source_task", pa.string()), ("metadata", pa.string()),
        ("created", pa.float64()), ("updated", pa.float64()),
        ("vector", pa.list_(pa.float32(), dim)),
    ])


class LanceMemoryStore:
    """Long-term memories in one LanceDB table (async API; opened on first use)."""

    def __init__(self, uri: str, table: str = "memories", *, dedup_threshold: float = 0.92,
                 index_min_rows: int = 20_000, storage_options: dict[str, str] | None = None
                 ) -> None:
        self.uri = uri
        self.table_name = table
        self.dedup_threshold = dedup_threshold
        self.index_min_rows = index_min_rows
        self.storage_options = storage_options
        self._db: Any = None
        self._table: Any = None
        self.dim: int | None = None

    async def _connect(self) -> Any:
        if self._db is None:
            try:
                import lancedb
            except ImportError:
                raise ImportError(f"long-term memory needs the memory extra: {MEMORY_EXTRA}"
                                  ) from None
            self._db = await lancedb.connect_async(self.uri,
                                                   storage_options=self.storage_options)
        return self._db

    async def _open(self, dim: int | None = None) -> Any:
        """The table; created with vectors of `dim` if it doesn't exist yet (None: don't)."""
        if self._table is not None:
            return self._table
        db = await self._connect()
        names: set[str] = set()
        token = None
        for _ in range(10_000):  # pages of table names (a handful of tables, one page)
            page = await db.list_tables(page_token=token)
            names.update(page.tables)
            token = page.page_token
            if not token:
                break
        if self.table_name in names:
            self._table = await db.open_table(self.table_name)
            vec = (await self._table.schema()).field("vector").type
            self.dim = vec.list_size
        elif dim is not None:
            self._table = await db.create_table(self.table_name, schema=_schema(dim),
                                                exist_ok=True)
            self.dim = dim
        return self._table

    def _check_dim(self, vectors: np.ndarray) -> None:
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have {vectors.shape[1]} dimensions but the memory table "
                             f"{self.table_name!r} at {self.uri} holds {self.dim}: the embedding "
                             "model changed; use a new memory.long_term.table")

    # ---- writes ------------------------------------------------------------------------------

    async def add(self, items: list[NewMemory], vectors: np.ndarray, *, dedup: bool = True,
                  now: float | None = None) -> list[tuple[str, str]]:
        """Write memories (one commit); returns (id, "inserted" | "updated") per item."""
        import numpy as np
        import pyarrow as pa

        if not items:
            return []
        table = await self._open(int(vectors.shape[1]))
        self._check_dim(vectors)
        now = time.time() if now is None else now
        thr = self.dedup_threshold
        ids: list[str] = [""] * len(items)
        actions: list[str] = ["inserted"] * len(items)
        created: dict[str, float] = {}
        if dedup and thr < 1.0:
            # Nearest stored neighbour of each item, one batched query per namespace.
            by_ns: dict[str, list[int]] = {}
            for i, it in enumerate(items):
                by_ns.setdefault(it.namespace, []).append(i)
            for ns, idx in by_ns.items():
                if await table.count_rows() == 0:
                    break
                q = table.vector_search([vectors[i] for i in idx]) if len(idx) > 1 else \
                    table.vector_search(vectors[idx[0]])
                res = await (q.distance_type("cosine").where(f"namespace = {sql_str(ns)}")
                             .select(["id", "created", "_distance"]).limit(1).to_arrow())
                qi = res.column("query_index").to_pylist() if "query_index" in \
                    res.column_names else [0] * res.num_rows
                for j, rid, dist, cr in zip(qi, res.column("id").to_pylist(),
                                            res.column("_distance").to_pylist(),
                                            res.column("created").to_pylist(), strict=True):
                    if 1.0 - dist >= thr:
                        ids[idx[j]], actions[idx[j]] = rid, "updated"
                        created[rid] = cr
            # Near copies inside the batch fold into the first of them.
            for idx in by_ns.values():
                if len(idx) < 2:
                    continue
                sims = vectors[idx] @ vectors[idx].T
                for a in range(len(idx)):
                    if ids[idx[a]] and actions[idx[a]] == "folded":
                        continue
                    for b in range(a + 1, len(idx)):
                        if ids[idx[b]] == "" and sims[a, b] >= thr:
                            if not ids[idx[a]]:
                                ids[idx[a]] = uuid.uuid4().hex
                            ids[idx[b]], actions[idx[b]] = ids[idx[a]], "folded"
        rows: dict[str, int] = {}  # id -> the item that writes it (the last one wins)
        for i in range(len(items)):
            if not ids[i]:
                ids[i] = uuid.uuid4().hex
            rows[ids[i]] = i
        order = list(rows.values())
        data = pa.table({
            "id": [ids[i] for i in order],
            "text": [items[i].text for i in order],
            "namespace": [items[i].namespace for i in order],
            "user": [items[i].user for i in order],
            "swarm": [items[i].swarm for i in order],
            "agent": [items[i].agent for i in order],
            "source_task": [items[i].source_task for i in order],
            "metadata": [json.dumps(items[i].metadata, default=str) for i in order],
            "created": [created.get(ids[i], now) for i in order],
            "updated": [now] * len(order),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(vectors[order], dtype=np.float32).ravel()),
                int(vectors.shape[1])),
        }, schema=_schema(int(vectors.shape[1])))
        if "updated" in actions:
            await (table.merge_insert("id").when_matched_update_all()
                   .when_not_matched_insert_all().execute(data))
        else:
            await table.add(data)
        return [(ids[i], "updated" if actions[i] == "folded" else actions[i])
                for i in range(len(items))]

    # ---- reads -------------------------------------------------------------------------------

    async def search(self, vector: np.ndarray, namespaces: list[str], k: int = 5,
                     min_score: float | None = None) -> list[Hit]:
        """The `k` memories nearest `vector` in `namespaces`, best first."""
        table = await self._open()
        if table is None or not namespaces:
            return []
        self._check_dim(vector.reshape(1, -1))
        where = "namespace IN (" + ", ".join(sql_str(n) for n in namespaces) + ")"
        res = await (table.vector_search(vector).distance_type("cosine").where(where)
                     .select([*_COLUMNS, "_distance"]).limit(k).to_arrow())
        hits = [_hit(r) for r in res.to_pylist()]
        if min_score is not None:
            hits = [h for h in hits if h.score >= min_score]
        return hits

    async def get(self, memory_id: str) -> Hit | None:
        """One memory by id, or None."""
        table = await self._open()
        if table is None:
            return None
        res = await (table.query().where(f"id = {sql_str(memory_id)}")
                     .select(list(_COLUMNS)).limit(1).to_arrow())
        rows = res.to_pylist()
        return _hit(rows[0]) if rows else None

    async def count(self, namespace: str | None = None) -> int:
        """Memories stored (in one namespace, if given)."""
        table = await self._open()
        if table is None:
            return 0
        return int(await table.count_rows(
            None if namespace is None else f"namespace = {sql_str(namespace)}"))

    # ---- deletes -----------------------------------------------------------------------------

    async def delete(self, *, ids: list[str] | None = None, user: str | None = None,
                     namespace: str | None = None, older_than: float | None = None) -> int:
        """Delete memories matching every condition given (ids, the user they came from, a
        namespace, last updated before an epoch time); returns how many were deleted."""
        conds = []
        if ids is not None:
            if not ids:
                return 0
            conds.append("id IN (" + ", ".join(sql_str(i) for i in ids) + ")")
        if user is not None:
            conds.append(f"(user = {sql_str(user)} OR namespace = "
                         f"{sql_str(namespace_for('user', user=user, swarm=''))})")
        if namespace is not None:
            conds.append(f"namespace = {sql_str(namespace)}")
        if older_than is not None:
            conds.append(f"updated < {float(older_than)!r}")
        if not conds:
            raise ValueError("delete needs at least one of ids, user, namespace, older_than")
        table = await self._open()
        if table is None:
            return 0
        where = " AND ".join(conds)
        n = int(await table.count_rows(where))
        if n:
            await table.delete(where)
        return n

    # ---- upkeep ------------------------------------------------------------------------------

    async def optimize(self, *, force_index: bool = False) -> dict[str, Any]:
        """Compact files, and build (or refresh) the vector and namespace indexes once the
        table has `index_min_rows` rows. Run it off the request path (a CLI or a cron)."""
        table = await self._open()
        if table is None:
            return {"rows": 0, "indexed": False}
        rows = int(await table.count_rows())
        indexed = False
        if force_index or rows >= self.index_min_rows:
            from lancedb.index import BTree, IvfHnswSq

            names = {ix.name for ix in await table.list_indices()}
            if "vector_idx" not in names:
                partitions = max(1, min(256, rows // 4096))
                await table.create_index("vector", config=IvfHnswSq(
                    distance_type="cosine", num_partitions=partitions))
            if "namespace_idx" not in names:
                await table.create_index("namespace", config=BTree())
            indexed = True
        await table.optimize()
        return {"rows": rows, "indexed": indexed}

    async def aclose(self) -> None:
        """Drop the table and connection handles."""
        if self._table is not None:
            self._table.close()
        self._table = None
        self._db = None


def _hit(r: dict[str, Any]) -> Hit:
    try:
        meta = json.loads(r.get("metadata") or "{}")
    except ValueError:
        meta = {}
    return Hit(id=r["id"], text=r["text"], namespace=r["namespace"],
               score=1.0 - float(r.get("_distance", 1.0)), user=r.get("user") or "",
               agent=r.get("agent") or "", source_task=r.get("source_task") or "",
               metadata=meta, created=float(r.get("created") or 0.0),
               updated=float(r.get("updated") or 0.0))
