"""ListTasks paging over the swarm's task table, in the order a2a-sdk's own stores use.

Tasks are listed newest status first, by `(has timestamp, status timestamp, id)` descending; a
page token names the last task of the previous page (a2a-sdk's `ListTasksCursor`), so it stays
valid when tasks change between pages. Plain functions over `Task` values: the supervisor actor
pages its table with them, and so does the in-process link.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from a2a.types import Task

SortKey = tuple[bool, int, str]


@dataclass(frozen=True)
class TaskQuery:
    """One ListTasks request, decoded: filters, the position after which the page starts, and
    the page size."""

    context_id: str = ""
    state: int = 0  # a2a TaskState value; 0: any
    since_ns: int | None = None  # status timestamp at or after, in epoch nanoseconds
    after: SortKey | None = None
    limit: int = 50


def sort_key(task: Task) -> SortKey:
    """A task's position in the listing order (sorted descending)."""
    has_ts = task.HasField("status") and task.status.HasField("timestamp")
    return has_ts, task.status.timestamp.ToNanoseconds() if has_ts else 0, task.id


def page(tasks: Iterable[Task], query: TaskQuery) -> tuple[list[Task], int, bool]:
    """The tasks of one page, how many tasks match the filters, and whether more follow."""
    chosen = [
        t for t in tasks
        if (not query.context_id or t.context_id == query.context_id)
        and (not query.state or t.status.state == query.state)
        and (query.since_ns is None or (t.status.HasField("timestamp")
                                        and t.status.timestamp.ToNanoseconds() >= query.since_ns))
    ]
    chosen.sort(key=sort_key, reverse=True)
    start = 0
    if query.after is not None:
        after = query.after
        start = next((i for i, t in enumerate(chosen) if sort_key(t) < after), len(chosen))
    end = start + query.limit
    return chosen[start:end], len(chosen), end < len(chosen)
