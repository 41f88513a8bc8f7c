"""The workloads on LangGraph: a two-node graph (model -> tools -> model ...) over
`MessagesState`, LangGraph's prebuilt `ToolNode` with the same `echo` tool, and a fake chat
model (a `BaseChatModel` subclass) answering with the same deterministic policy as swarm's side.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from scripts.bench.common import (
    ANSWER,
    MODEL_LATENCY_S,
    TOOL_STEPS,
    PeakRss,
    Procs,
    concurrency_row,
    cpu_delta,
    openai_messages_bytes,
    payload,
    pct,
    step_gaps_us,
    sustain,
    sustained_row,
    wants_tool,
)


@tool
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


class EchoChatModel(BaseChatModel):
    """The deterministic policy as a LangChain chat model: one `echo` tool call per call until
    `steps - 1` tool results are in, then the answer. `latency_s` sleeps (async calls only)."""

    steps: int
    latency_s: float = 0.0
    # perf_counter at each call, when given (typed Any: pydantic would copy a list field).
    stamps: Any = None

    @property
    def _llm_type(self) -> str:
        return "swarm-bench-echo"

    def _reply(self, messages: list[BaseMessage]) -> ChatResult:
        if self.stamps is not None:
            self.stamps.append(time.perf_counter())
        # Counting from the end: the tool results are the ToolMessages; the policy is O(1) in
        # the history as swarm's is (the count is carried, not rescanned).
        results = (len(messages) - 1) // 2
        if wants_tool(results, self.steps):
            msg = AIMessage(content="", tool_calls=[{
                "name": "echo", "args": {"text": payload(results)}, "id": f"call_{results:05d}",
                "type": "tool_call"}])
        else:
            msg = AIMessage(content=ANSWER)
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        return self._reply(messages)

    async def _agenerate(self, messages: list[BaseMessage], stop: Any = None,
                         run_manager: Any = None, **kwargs: Any) -> ChatResult:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return self._reply(messages)


def build_graph(model: EchoChatModel, checkpointer: Any = None, use_async: bool = False) -> Any:
    """model -> (tool calls?) tools -> model ... -> END, compiled with `checkpointer`."""
    if use_async:
        async def call_model(state: MessagesState) -> dict[str, Any]:
            return {"messages": [await model.ainvoke(state["messages"])]}
    else:
        def call_model(state: MessagesState) -> dict[str, Any]:  # type: ignore[misc]
            return {"messages": [model.invoke(state["messages"])]}

    g = StateGraph(MessagesState)
    g.add_node("model", call_model)
    g.add_node("tools", ToolNode([echo]))
    g.add_edge(START, "model")
    g.add_conditional_edges("model", tools_condition)
    g.add_edge("tools", "model")
    return g.compile(checkpointer=checkpointer)


def _recursion_limit(steps: int) -> int:
    return 2 * steps + 10


def _db_bytes(path: Path) -> int:
    """The database file and its write-ahead log."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def step_overhead(steps: int, tasks: int) -> dict[str, Any]:
    """`tasks` tasks of `steps` model calls, one at a time, SqliteSaver on a file; per-step µs
    from consecutive model calls, and wall per step to the return of `invoke` (LangGraph's
    default durability "async" writes each step's checkpoint in the background while the next
    step runs, and `invoke` returns once the last one is committed)."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    folder = Path(tempfile.mkdtemp(prefix="bench-lg-"))
    db = folder / "ckpt.sqlite"
    conn = sqlite3.connect(db, check_same_thread=False)
    saver = SqliteSaver(conn)
    gaps: list[float] = []
    walls: list[float] = []
    # Warm up (imports, the schema, caches): one short task on its own thread id.
    warm = build_graph(EchoChatModel(steps=3), saver)
    warm.invoke({"messages": [("user", "bench")]}, {"configurable": {"thread_id": "warm"}})
    for i in range(tasks):
        stamps: list[float] = []
        graph = build_graph(EchoChatModel(steps=steps, stamps=stamps), saver)
        cfg = {"configurable": {"thread_id": f"t{i}"}, "recursion_limit": _recursion_limit(steps)}
        t0 = time.perf_counter()
        out = graph.invoke({"messages": [("user", "bench")]}, cfg)
        wall = time.perf_counter() - t0
        assert out["messages"][-1].content == ANSWER, out["messages"][-1]
        assert sum(isinstance(m, ToolMessage) for m in out["messages"]) == steps - 1
        gaps += step_gaps_us(stamps)
        walls.append(wall / steps * 1e6)
    conn.close()
    size = _db_bytes(db)
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return {"impl": "langgraph+sqlite", "steps": steps, "tasks": tasks,
            "p50_us": pct(gaps, 50), "p99_us": pct(gaps, 99),
            "durable_us_per_step": min(walls), "durable_us_per_step_median": pct(walls, 50),
            "db_bytes": size}


def growth(marks: list[int]) -> dict[str, Any]:
    """One task up to the last mark; SQLite bytes (database + WAL, checkpointed at each mark so
    the figure is the database's own) at each mark."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    folder = Path(tempfile.mkdtemp(prefix="bench-lg-growth-"))
    db = folder / "ckpt.sqlite"
    conn = sqlite3.connect(db, check_same_thread=False)
    saver = SqliteSaver(conn)
    saver.setup()
    steps = max(marks)
    sizes: dict[int, int] = {}

    class Marking(EchoChatModel):
        def _reply(self, messages: list[BaseMessage]) -> ChatResult:
            done = (len(messages) - 1) // 2  # tool steps completed and checkpointed
            if done in marks and done not in sizes:
                with saver.lock:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                sizes[done] = _table_bytes(conn)
            return super()._reply(messages)

    graph = build_graph(Marking(steps=steps + 1), saver)
    cfg = {"configurable": {"thread_id": "g"}, "recursion_limit": _recursion_limit(steps + 1)}
    graph.invoke({"messages": [("user", "bench")]}, cfg, durability="sync")
    conn.close()
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return {"impl": "langgraph+sqlite", "rows": [
        {"step": m, "stored_bytes": sizes[m], "message_bytes": openai_messages_bytes(m + 1)}
        for m in marks if m in sizes]}


def _table_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the database's pages in use (page_count - freelist) x page_size."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def concurrency(sessions: int, durable: bool) -> dict[str, Any]:
    """`sessions` tasks at once in one asyncio loop (`ainvoke`), each 10 tool steps and an
    answer with a 200 ms model; with AsyncSqliteSaver on a file, or no checkpointer."""
    return asyncio.run(_concurrency(sessions, durable))


def sustained(sessions: int, durable: bool) -> dict[str, Any]:
    """The same tasks, `sessions` of them kept in flight (`scripts.bench.common.sustain`)."""
    return asyncio.run(_concurrency(sessions, durable, sustained=True))


async def _concurrency(sessions: int, durable: bool, sustained: bool = False
                       ) -> dict[str, Any]:
    import contextlib

    procs = Procs()
    folder = Path(tempfile.mkdtemp(prefix="bench-lg-conc-"))
    async with contextlib.AsyncExitStack() as stack:
        saver = None
        if durable:
            from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

            saver = await stack.enter_async_context(
                AsyncSqliteSaver.from_conn_string(str(folder / "ckpt.sqlite")))
            await saver.setup()
        model = EchoChatModel(steps=TOOL_STEPS + 1, latency_s=MODEL_LATENCY_S)
        graph = build_graph(model, saver, use_async=True)
        await graph.ainvoke({"messages": [("user", "warm")]},
                            {"configurable": {"thread_id": "warm"}})
        base_rss = procs.freeze().rss()
        cpu0 = procs.cpu()

        async def one(i: int | str) -> int:
            out = await graph.ainvoke({"messages": [("user", "bench")]},
                                      {"configurable": {"thread_id": f"t{i}"}})
            assert out["messages"][-1].content == ANSWER
            return TOOL_STEPS

        impl = "langgraph+sqlite" if durable else "langgraph (no checkpointer)"
        if sustained:
            async def ended(i: str) -> float:
                await one(i)
                return time.time()

            async def run_group(group: int, rnd: int, n: int) -> list[float]:
                return list(await asyncio.gather(*(ended(f"{group}.{rnd}.{i}")
                                                   for i in range(n))))

            window = await sustain(run_group, sessions, procs)
        else:
            with PeakRss(procs) as peak:
                t0 = time.perf_counter()
                done = await asyncio.gather(*(one(i) for i in range(sessions)))
                wall = time.perf_counter() - t0
            cpu = cpu_delta(cpu0, procs.cpu())
    shutil.rmtree(folder, ignore_errors=True)
    if sustained:
        return sustained_row(impl, sessions, window, processes=1, pid=os.getpid())
    return concurrency_row(impl, sessions, wall, sum(done), cpu, peak.peak - base_rss,
                           peak=peak, processes=1, pid=os.getpid())
