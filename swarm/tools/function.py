"""Python functions as tools: schemas from type hints, validated arguments, timeouts."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import importlib
import inspect
import json
import logging
import os
import queue
import threading
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import ArgsKwargs, to_jsonable_python

from swarm.errors import ConfigError, ToolError
from swarm.tools.interface import ToolContext, ToolResult, ToolSource, ToolSpec
from swarm.tools.resilience import cap_result

if typing.TYPE_CHECKING:
    from swarm.config import ToolServerConfig

log = logging.getLogger(__name__)

_HINTS_ATTR = "__swarm_tool_hints__"
_CTX_PARAM = "ctx"
# Sync calls of one source running at once (as many as asyncio's default executor has threads),
# not counting calls that timed out and still run.
SYNC_THREADS = min(32, (os.cpu_count() or 1) + 4)


@dataclass(frozen=True, slots=True)
class ToolHints:
    """Behaviour hints a function declares with `@tool`."""

    read_only: bool = False
    destructive: bool = True
    idempotent: bool = False
    inline: bool = False  # a sync function that never blocks: called on the event loop


def tool(
    *, read_only: bool = False, idempotent: bool = False, destructive: bool | None = None,
    inline: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a function's behaviour hints; `destructive` defaults to `not read_only`.

    `inline=True` declares a sync function that returns at once (no I/O, no waiting, a few
    microseconds of CPU): it runs on the agent's event loop instead of a worker thread, which
    saves the thread hand-off (tens of microseconds a call); the source's timeout can't stop
    it. Leave it off for anything that may block: a blocked event loop stalls every session
    of the replica.
    """
    hints = ToolHints(
        read_only=read_only,
        destructive=(not read_only) if destructive is None else destructive,
        idempotent=idempotent,
        inline=inline,
    )

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, _HINTS_ATTR, hints)
        return fn

    return mark


@dataclass(frozen=True, slots=True)
class _FunctionTool:
    spec: ToolSpec
    fn: Callable[..., Any]
    args: TypeAdapter[dict[str, Any]]
    wants_ctx: bool
    is_async: bool
    inline: bool  # sync, declared non-blocking: called directly
    # For a signature of plain `str`, `int`, `float` and `bool` parameters: each one's type
    # and whether it is required (`_plain_kwargs`); None for any other signature.
    plain: dict[str, tuple[type, bool]] | None = None


_PLAIN_TYPES = (str, int, float, bool)
_FLOAT_INT = 2**1023  # an int smaller than this in size converts to a float without overflow


def _plain_kwargs(plain: dict[str, tuple[type, bool]], arguments: dict[str, Any]
                  ) -> dict[str, Any] | None:
    """The arguments to call the function with, when each has exactly its parameter's type
    (an int for a float is made a float, as the validator does) and none is missing or unknown:
    what the validator would pass, less the defaults of parameters not given (the function's
    own apply); else None, and the validator decides (coercions and errors)."""
    kwargs = dict(arguments)
    for key, value in kwargs.items():
        want = plain.get(key)
        if want is None:
            return None
        kind = type(value)
        if kind is not want[0]:
            if want[0] is float and kind is int and -_FLOAT_INT < value < _FLOAT_INT:
                kwargs[key] = float(value)
                continue
            return None
    if len(kwargs) < len(plain) and any(
            required and key not in kwargs for key, (_, required) in plain.items()):
        return None
    return kwargs


class _Call:
    __slots__ = ("fn", "future", "stuck")

    def __init__(self, future: concurrent.futures.Future[Any], fn: Callable[[], Any]) -> None:
        self.future = future
        self.fn = fn
        self.stuck = False  # timed out and still running: its thread doesn't count


class ToolThreads:
    """The worker threads of one source's sync functions.

    At most `size` calls run at once, not counting calls that timed out and still run: Python
    can't stop a thread, so such a call keeps its thread until it returns, and another thread
    takes its place. A hung function then costs a thread, not the pool: asyncio's default
    executor has a fixed number of threads, and a few hung calls left every later call queued
    until it timed out, for the life of the process. The threads are daemon threads, so one
    that never returns doesn't hold up the process's exit (the default executor's threads are
    joined at exit).
    """

    def __init__(self, size: int = SYNC_THREADS, name: str = "tool") -> None:
        self.size = size
        self.name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads = 0  # threads alive, stuck ones included
        self._stuck = 0
        self._closed = False

    @property
    def stuck(self) -> int:
        """Calls that timed out and still run."""
        return self._stuck

    def submit(self, fn: Callable[[], Any]) -> _Call:
        """Queue a call; its `future` gets the result."""
        call = _Call(concurrent.futures.Future(), fn)
        self._calls.put(call)
        if self._idle.acquire(blocking=False):
            return call  # an idle thread takes it
        with self._lock:
            self._add_thread()
        return call

    def _add_thread(self) -> None:
        # Under the lock: one more thread, if fewer than `size` run calls that aren't stuck.
        if self._threads - self._stuck < self.size and not self._closed:
            self._threads += 1
            threading.Thread(target=self._work, name=f"{self.name}-{self._threads}",
                             daemon=True).start()

    def abandon(self, call: _Call) -> int:
        """Give up on a call that timed out: if it still runs, its thread no longer counts
        against `size`. Returns how many calls are stuck so, 0 if this one ended already or
        never started (it won't now)."""
        with self._lock:
            if call.stuck or call.future.cancel() or call.future.done():
                return 0
            call.stuck = True
            self._stuck += 1
            self._add_thread()  # in its place, for calls queued already and the next ones
            return self._stuck

    def close(self) -> None:
        """Let the idle threads end; stuck ones end when their call returns."""
        with self._lock:
            self._closed = True
            threads = self._threads
        for _ in range(threads):
            self._calls.put(None)

    def _work(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                break
            if call.future.set_running_or_notify_cancel():
                try:
                    result = call.fn()
                except BaseException as exc:
                    call.future.set_exception(exc)
                else:
                    call.future.set_result(result)
            with self._lock:
                if call.stuck:
                    self._stuck -= 1
                    call.stuck = False
                # One more than `size` would run now (a stuck call came back): this one ends.
                if self._threads - self._stuck > self.size:
                    break
            del call
            self._idle.release()
        with self._lock:
            self._threads -= 1


class FunctionToolSource(ToolSource):
    """Serves plain Python functions (sync or async) as tools.

    Sync functions run in worker threads of the source's own (`ToolThreads`, unless declared
    `@tool(inline=True)`); a timed-out sync function keeps running in its thread (Python can't
    stop it), but its result is dropped, and its thread no longer counts against the source's
    `SYNC_THREADS`: hung calls can't leave later calls without a thread.
    """

    def __init__(
        self,
        name: str,
        functions: Sequence[str | Callable[..., Any]],
        *,
        timeout_s: float = 30.0,
        max_result_chars: int = 65536,
    ) -> None:
        """Take functions or `package.module:function` import paths; problems raise ConfigError."""
        self.name = name
        self.timeout_s = timeout_s
        self.max_result_chars = max_result_chars
        self._tools: dict[str, _FunctionTool] = {}
        self._threads: ToolThreads | None = None  # started by the first sync call
        problems: list[tuple[str, str]] = []
        for i, item in enumerate(functions):
            where = f"tools.{name}.python.{i}"
            try:
                fn = import_function(item) if isinstance(item, str) else item
            except Exception as e:  # importing user code can raise anything
                problems.append((where, f"can't import {item!r}: {type(e).__name__}: {e}"))
                continue
            try:
                built = _build(fn, name)
            except (TypeError, ValueError) as e:
                problems.append((where, str(e)))
                continue
            if built.spec.name in self._tools:
                problems.append((where, f"duplicate tool {built.spec.name!r}"))
                continue
            self._tools[built.spec.name] = built
        if problems:
            raise ConfigError(problems)

    @classmethod
    def from_config(cls, name: str, config: ToolServerConfig) -> FunctionToolSource:
        """Build the source for a `ToolServerConfig` that has `python:` set."""
        if config.python is None:
            raise ConfigError([(f"tools.{name}.python", "not a python tool server")])
        return cls(name, config.python, timeout_s=config.timeout_s,
                   max_result_chars=config.max_result_chars)

    async def list_tools(self) -> list[ToolSpec]:
        """The functions' specs, in the order given."""
        return [t.spec for t in self._tools.values()]

    async def aclose(self) -> None:
        """End the idle worker threads (a stuck one ends when its call returns)."""
        threads, self._threads = self._threads, None
        if threads is not None:
            threads.close()

    async def call(self, tool: str, arguments: dict[str, Any], ctx: ToolContext) -> ToolResult:
        """Validate the arguments, run the function under the timeout and encode its result."""
        entry = self._tools.get(tool)
        if entry is None:
            known = ", ".join(sorted(self._tools))
            message = f"unknown tool {tool!r} in {self.name!r}; known: {known}"
            return ToolResult(message, is_error=True)
        kwargs = None if entry.plain is None or type(arguments) is not dict else \
            _plain_kwargs(entry.plain, arguments)
        if kwargs is None:
            try:
                kwargs = entry.args.validate_python(ArgsKwargs((), dict(arguments or {})))
            except ValidationError as e:
                return ToolResult(f"invalid arguments for {tool!r}: {_describe(e)}",
                                  is_error=True)
        if entry.wants_ctx:
            kwargs[_CTX_PARAM] = ctx
        if entry.inline:
            try:
                value = entry.fn(**kwargs)
            except (Exception, SystemExit, KeyboardInterrupt) as e:
                return _raised(e)
            if not inspect.isawaitable(value):
                return cap_result(_encode(value, tool), self.max_result_chars)
            work = value
        elif entry.is_async:
            work = entry.fn(**kwargs)
        else:
            threads = self._threads
            if threads is None:
                threads = self._threads = ToolThreads(name=f"tool-{self.name}")
            # In the caller's context (as `asyncio.to_thread` runs it): tracing reads it.
            call = threads.submit(functools.partial(
                contextvars.copy_context().run, entry.fn, **kwargs))
            work = asyncio.wrap_future(call.future)
        deadline = asyncio.timeout(self.timeout_s)
        try:
            async with deadline:
                value = await work
                if inspect.isawaitable(value):  # e.g. a partial or object wrapping an async def
                    value = await value
        except TimeoutError as e:
            if not deadline.expired():  # the function's own TimeoutError is its result
                return ToolResult(f"TimeoutError: {e}", is_error=True)
            if not entry.is_async and not entry.inline:
                stuck = threads.abandon(call)
                if stuck:
                    log.warning(
                        "tool %r in %r timed out after %gs and still runs in its thread "
                        "(Python can't stop it); another thread takes its place, %d stuck "
                        "so in this source", tool, self.name, self.timeout_s, stuck)
            raise ToolError(
                f"tool {tool!r} in {self.name!r} timed out after {self.timeout_s:g}s"
            ) from None
        except (Exception, SystemExit, KeyboardInterrupt) as e:
            return _raised(e)
        return cap_result(_encode(value, tool), self.max_result_chars)


def _raised(e: BaseException) -> ToolResult:
    """What a tool raised, as its error result. `SystemExit` (a `sys.exit()` in the tool) and
    `KeyboardInterrupt` too: let through, either would stop the replica's event loop, and
    every session on it with it."""
    return ToolResult(f"{type(e).__name__}: {e}", is_error=True)


def import_function(path: str) -> Callable[..., Any]:
    """Resolve `package.module:function` to the callable it names."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError("expected package.module:function")
    module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if fn is None:
        raise AttributeError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise TypeError(f"{path!r} names a value of type {type(fn).__name__}, not a function")
    return typing.cast(Callable[..., Any], fn)


def _build(fn: Callable[..., Any], source: str) -> _FunctionTool:
    name = getattr(fn, "__name__", None)
    if not name or name == "<lambda>":
        raise ValueError(f"{fn!r} needs a name to be a tool")
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as e:
        raise TypeError(f"can't resolve the type hints of {name!r}: {e}") from e
    sig = inspect.signature(fn)
    params = []
    wants_ctx = False
    for p in sig.parameters.values():
        annotation = hints.get(p.name, Any)
        if p.name == _CTX_PARAM and _is_context(annotation):
            wants_ctx = True
            continue
        if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL):
            raise TypeError(f"{name!r}: parameter {p.name!r} can't be passed by keyword")
        params.append(p.replace(annotation=annotation))

    # Pydantic builds an arguments validator from a signature; the stub carries the function's
    # signature minus `ctx` and hands back the validated arguments instead of running anything.
    def stub(**kwargs: Any) -> dict[str, Any]:
        return kwargs

    stub.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    stub.__annotations__ = {p.name: p.annotation for p in params}
    stub.__name__ = stub.__qualname__ = name
    adapter: TypeAdapter[dict[str, Any]] = TypeAdapter(stub)
    declared = getattr(fn, _HINTS_ATTR, None) or ToolHints()
    spec = ToolSpec(
        name=name,
        description=_first_paragraph(inspect.getdoc(fn)),
        parameters=_strip_titles(adapter.json_schema()),
        source=source,
        read_only=declared.read_only,
        destructive=declared.destructive,
        idempotent=declared.idempotent,
    )
    is_async = inspect.iscoroutinefunction(fn)
    plain = {p.name: (p.annotation, p.default is p.empty) for p in params}
    if not all(t in _PLAIN_TYPES for t, _ in plain.values()) or \
            any(p.kind is p.VAR_KEYWORD for p in params):
        plain = None
    return _FunctionTool(spec, fn, adapter, wants_ctx, is_async,
                         declared.inline and not is_async, plain)


def _is_context(annotation: Any) -> bool:
    if annotation is ToolContext:
        return True
    args = typing.get_args(annotation)
    return ToolContext in args and all(a in (ToolContext, type(None)) for a in args)


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    return " ".join(doc.strip().split("\n\n", 1)[0].split())


def _strip_titles(schema: Any) -> Any:
    """Drop pydantic's generated "title" keys, keeping properties that happen to be named title."""
    if isinstance(schema, list):
        return [_strip_titles(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "patternProperties") and isinstance(value, dict):
            out[key] = {k: _strip_titles(v) for k, v in value.items()}
        else:
            out[key] = _strip_titles(value)
    return out


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<arguments>"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def _encode(value: Any, tool: str = "") -> ToolResult:
    if isinstance(value, str):
        return ToolResult(value)
    odd: list[str] = []

    def as_text(v: Any) -> str:  # what JSON can't hold goes as its str(), and is warned of
        odd.append(type(v).__name__)
        return str(v)

    text = json.dumps(to_jsonable_python(value, fallback=as_text), ensure_ascii=False)
    for kind in odd:
        if (tool, kind) not in _WARNED and len(_WARNED) < _WARNED_MAX:
            _WARNED.add((tool, kind))
            log.warning("tool %r returned a %s, which JSON can't hold: the model gets its "
                        "str() (return a str, a number, a dict or list of them, a dataclass "
                        "or a pydantic model)", tool, kind)
    return ToolResult(text, structured=value if isinstance(value, dict | list) else None)


# (tool, type) pairs warned of once (`_encode`), at most this many.
_WARNED: set[tuple[str, str]] = set()
_WARNED_MAX = 1000
