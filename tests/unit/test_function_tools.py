"""FunctionToolSource: schemas from hints, validation, errors, timeouts, ctx injection, imports."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Literal

import pytest

from swarm.config import ToolServerConfig
from swarm.errors import ConfigError, ToolError
from swarm.examples import tools as example_tools
from swarm.tools.function import FunctionToolSource, _plain_kwargs, tool
from swarm.tools.interface import ToolContext

CTX = ToolContext(task_id="t1", agent="researcher", session_id="s-42", call_id="c1")


def _keys(obj: object) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def lookup(topic: str, limit: int = 5, mode: Literal["fast", "deep"] = "fast",
           tags: list[str] | None = None, ctx: ToolContext | None = None) -> dict:
    """Look a topic up in the index.

    This second paragraph is detail for humans and must not reach the model.
    """
    return {"topic": topic, "limit": limit, "mode": mode, "tags": tags,
            "session": ctx.session_id if ctx else None}


@tool(read_only=False, idempotent=True, destructive=False)
def save(title: str) -> str:
    """Save something."""
    return f"saved {title}"


async def whoami(ctx: ToolContext) -> str:
    """Say who is calling."""
    return f"{ctx.agent}/{ctx.session_id}/{ctx.call_id}"


def thread_name() -> str:
    """Name the thread the tool ran in."""
    return threading.current_thread().name


def own_timeout() -> str:
    """Raise the function's own TimeoutError."""
    raise TimeoutError("upstream API timed out")


def source(*fns, timeout_s: float = 5.0) -> FunctionToolSource:
    return FunctionToolSource("fn", list(fns), timeout_s=timeout_s)


async def test_schema_comes_from_type_hints_without_ctx_or_titles():
    specs = {s.name: s for s in await source(lookup, whoami).list_tools()}
    params = specs["lookup"].parameters
    assert params["type"] == "object"
    assert set(params["properties"]) == {"topic", "limit", "mode", "tags"}
    assert params["required"] == ["topic"]
    assert params["properties"]["limit"] == {"default": 5, "type": "integer"}
    assert params["properties"]["mode"]["enum"] == ["fast", "deep"]
    assert "title" not in _keys(params)
    assert specs["whoami"].parameters["properties"] == {}
    assert specs["lookup"].description == "Look a topic up in the index."
    assert specs["lookup"].source == "fn"
    assert specs["lookup"].openai_schema()["function"]["parameters"] == params


async def test_a_property_named_title_survives_title_stripping():
    (spec,) = await source(save).list_tools()
    assert spec.parameters["properties"] == {"title": {"type": "string"}}


async def test_hints_from_decorator_and_conservative_defaults():
    specs = {s.name: s for s in await FunctionToolSource(
        "ex", ["swarm.examples.tools:echo", "swarm.examples.tools:fail"]).list_tools()}
    assert (specs["echo"].read_only, specs["echo"].idempotent, specs["echo"].destructive) == (
        True, True, False)
    assert (specs["fail"].read_only, specs["fail"].idempotent, specs["fail"].destructive) == (
        False, False, True)
    (saved,) = await source(save).list_tools()
    assert (saved.read_only, saved.idempotent, saved.destructive) == (False, True, False)


async def test_valid_arguments_are_coerced_and_results_encoded():
    result = await source(lookup).call("lookup", {"topic": "kv cache", "limit": "2"}, CTX)
    assert not result.is_error
    assert result.structured == {"topic": "kv cache", "limit": 2, "mode": "fast", "tags": None,
                                 "session": "s-42"}
    assert '"limit": 2' in result.content
    count = await source(example_tools.word_count).call("word_count", {"text": "a b  c"}, CTX)
    assert (count.content, count.structured) == ("3", None)
    echoed = await source(example_tools.echo).call("echo", {"text": "héllo"}, CTX)
    assert echoed.content == "héllo"


@pytest.mark.parametrize(
    ("args", "field", "problem"),
    [
        ({}, "topic", "Missing required argument"),
        ({"topic": 3}, "topic", "valid string"),
        ({"topic": "x", "limit": "many"}, "limit", "valid integer"),
        ({"topic": "x", "mode": "slow"}, "mode", "'fast' or 'deep'"),
        ({"topic": "x", "colour": "red"}, "colour", "Unexpected keyword argument"),
    ],
)
async def test_invalid_arguments_name_the_bad_field(args, field, problem):
    result = await source(lookup).call("lookup", args, CTX)
    assert result.is_error
    assert result.content.startswith("invalid arguments for 'lookup': ")
    assert f"{field}: " in result.content and problem in result.content


class _Str(str):
    pass


def plain(text: str, n: int, x: float = 1.5, flag: bool = False, ctx: ToolContext | None = None
          ) -> dict:
    """Plain parameters: the fast path's kind of signature."""
    return {"text": text, "n": n, "x": x, "flag": flag}


_FAST = [{"text": "a", "n": 1}, {"text": "a", "n": 1, "x": 2, "flag": True},
         {"text": "a", "n": 1, "x": 2.5}]


@pytest.mark.parametrize("args", [
    {"text": "a", "n": 1},
    {"text": "a", "n": 1, "x": 2, "flag": True},  # an int for a float becomes a float
    {"text": "a", "n": 1, "x": 2.5},
    {"text": "a", "n": "7"},  # coerced by the validator
    {"text": "a", "n": 1.0},
    {"text": "a", "n": True},
    {"text": "a", "n": 1, "flag": 1},
    {"text": "a", "n": 1, "flag": "yes"},
    {"text": b"a", "n": 1},
    {"text": None, "n": 1},
    {"text": "a"},  # missing
    {"n": 1, "x": 1.0},
    {"text": "a", "n": 1, "other": 3},  # unknown
    {},
    {"text": "a", "n": 1, "x": True},  # a bool for a float
    {"text": "a", "n": 1, "x": 10**400},  # an int too large for a float
    {"text": _Str("a"), "n": 1},  # a str subclass
])
async def test_plain_signatures_take_the_fast_path_with_the_validators_results(args):
    fast = source(plain)
    entry = fast._tools["plain"]
    assert entry.plain is not None  # the kind of signature the fast path serves
    slow = source(plain)
    slow._tools["plain"] = type(entry)(entry.spec, entry.fn, entry.args, entry.wants_ctx,
                                       entry.is_async, entry.inline, None)
    taken = _plain_kwargs(entry.plain, args) is not None
    fast_case = any(a == args and all(type(a[k]) is type(args[k]) for k in a) for a in _FAST)
    assert taken == fast_case, args  # the cases the fast path serves, and only those
    got, want = await fast.call("plain", args, CTX), await slow.call("plain", args, CTX)
    assert (got.content, got.is_error, got.structured) == \
        (want.content, want.is_error, want.structured)
    if not got.is_error:
        assert type(got.structured["x"]) is float


def test_other_signatures_always_go_through_the_validator():
    assert source(lookup)._tools["lookup"].plain is None  # Literal, list, Optional
    assert source(example_tools.echo)._tools["echo"].plain == {"text": (str, True)}


async def test_a_raised_exception_becomes_an_error_result():
    src = FunctionToolSource("ex", ["swarm.examples.tools:fail"])
    assert (await src.call("fail", {}, CTX)).content == "RuntimeError: boom"
    result = await src.call("fail", {"message": "disk full"}, CTX)
    assert result.is_error and result.content == "RuntimeError: disk full"


def exits() -> str:
    """Call sys.exit, as a script turned into a tool might."""
    sys.exit(2)


async def interrupted() -> str:
    """Raise KeyboardInterrupt from an async tool."""
    raise KeyboardInterrupt("stop")


@tool(inline=True)
def exits_inline() -> str:
    """sys.exit from an inline tool."""
    sys.exit("bye")


async def test_a_tool_that_exits_or_is_interrupted_is_an_error_result_not_a_dead_loop():
    """SystemExit and KeyboardInterrupt are BaseExceptions: let out of the tool, either would
    stop the replica's event loop with every session on it. Each is the call's error."""
    src = source(exits, interrupted, exits_inline)
    assert (await src.call("exits", {}, CTX)).content == "SystemExit: 2"
    assert (await src.call("interrupted", {}, CTX)).content == "KeyboardInterrupt: stop"
    assert (await src.call("exits_inline", {}, CTX)).content == "SystemExit: bye"
    await asyncio.sleep(0)  # the loop goes on
    assert (await src.call("exits", {}, CTX)).is_error  # and so does the source


class _Opaque:
    def __str__(self) -> str:
        return "opaque thing"


def opaque() -> object:
    """Return an object JSON can't hold."""
    return {"thing": _Opaque()}


async def test_a_result_json_cant_hold_goes_as_its_str_with_a_warning(caplog):
    src = source(opaque)
    result = await src.call("opaque", {}, CTX)
    assert not result.is_error and result.content == '{"thing": "opaque thing"}'
    await src.call("opaque", {}, CTX)
    warned = [r.getMessage() for r in caplog.records if r.name == "swarm.tools.function"]
    assert len(warned) == 1, warned  # once a tool and type
    assert "tool 'opaque' returned a _Opaque, which JSON can't hold" in warned[0]


async def test_the_functions_own_timeout_error_is_a_result_not_a_timeout():
    result = await source(own_timeout).call("own_timeout", {}, CTX)
    assert result.is_error and result.content == "TimeoutError: upstream API timed out"


async def test_async_function_times_out_with_a_tool_error():
    src = source(example_tools.slow, timeout_s=0.2)
    with pytest.raises(ToolError, match=r"'slow' in 'fn' timed out after 0.2s"):
        await src.call("slow", {"seconds": 20}, CTX)
    assert (await src.call("slow", {"seconds": 0}, CTX)).content == "slept 0s"


async def test_sync_function_runs_in_a_thread_and_times_out():
    release = threading.Event()

    def blocking() -> str:
        """Block until released."""
        release.wait(10)
        return "done"

    src = source(blocking, thread_name, timeout_s=0.2)
    try:
        with pytest.raises(ToolError, match="timed out"):
            await src.call("blocking", {}, CTX)
    finally:
        release.set()
    ran_in = (await src.call("thread_name", {}, CTX)).content
    assert ran_in != threading.current_thread().name


async def test_an_inline_sync_function_runs_on_the_event_loop_thread():
    @tool(read_only=True, inline=True)
    def inline_thread() -> str:
        """Name the thread the tool ran in."""
        return threading.current_thread().name

    @tool(inline=True)
    def inline_fails(n: int) -> str:
        """Fail."""
        raise ValueError(f"bad n {n}")

    src = source(inline_thread, inline_fails, thread_name)
    assert (await src.call("inline_thread", {}, CTX)).content == \
        threading.current_thread().name
    assert (await src.call("thread_name", {}, CTX)).content != threading.current_thread().name
    failed = await src.call("inline_fails", {"n": "7"}, CTX)
    assert failed.is_error and failed.content == "ValueError: bad n 7"
    invalid = await src.call("inline_fails", {"n": "x"}, CTX)
    assert invalid.is_error and "n" in invalid.content


async def test_ctx_is_injected_and_not_a_parameter():
    src = source(whoami, lookup)
    assert (await src.call("whoami", {}, CTX)).content == "researcher/s-42/c1"
    result = await src.call("whoami", {"ctx": {"agent": "forged"}}, CTX)
    assert result.is_error and "ctx: Unexpected keyword argument" in result.content


async def test_unknown_tool_is_an_error_result_listing_known_tools():
    result = await source(lookup, whoami).call("lokup", {}, CTX)
    assert result.is_error and "known: lookup, whoami" in result.content


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("swarm.examples.no_such_module:echo", "ModuleNotFoundError"),
        ("swarm.examples.tools:no_such_function", "has no attribute 'no_such_function'"),
        ("swarm.examples.tools:MAX_SLOW_S", "not a function"),
        ("swarm.examples.tools", "expected package.module:function"),
    ],
)
def test_bad_import_path_is_a_config_error_naming_it(path, expected):
    with pytest.raises(ConfigError) as info:
        FunctionToolSource("demo", ["swarm.examples.tools:echo", path])
    ((where, message),) = info.value.problems
    assert where == "tools.demo.python.1"
    assert repr(path) in message and expected in message


def test_duplicate_and_positional_only_functions_are_rejected():
    def positional(x: int, /) -> int:
        """Positional only."""
        return x

    with pytest.raises(ConfigError, match="duplicate tool 'echo'"):
        source(example_tools.echo, example_tools.echo)
    with pytest.raises(ConfigError, match="'x' can't be passed by keyword"):
        source(positional)


async def test_from_config_uses_paths_and_timeout():
    config = ToolServerConfig(python=["swarm.examples.tools:echo", "swarm.examples.tools:slow"],
                              timeout_s=0.1)
    src = FunctionToolSource.from_config("demo", config)
    assert [s.name for s in await src.list_tools()] == ["echo", "slow"]
    with pytest.raises(ToolError, match=r"timed out after 0\.1s"):
        await src.call("slow", {"seconds": 5}, CTX)


async def test_hung_sync_calls_cost_a_thread_each_not_the_sources_threads(caplog):
    # More hung calls than the source runs at once: each times out with the tool error, and
    # a later call still gets a thread (asyncio's default executor would have none left).
    from swarm.tools import function

    release = threading.Event()

    def hang() -> str:
        """Block until released."""
        release.wait(60)
        return "released"

    src = source(hang, thread_name, timeout_s=0.3)
    try:
        with caplog.at_level("WARNING", logger="swarm.tools.function"):
            for _ in range(function.SYNC_THREADS + 1):
                with pytest.raises(ToolError, match=r"'hang' in 'fn' timed out after 0.3s"):
                    await src.call("hang", {}, CTX)
        result = await src.call("thread_name", {}, CTX)
        assert not result.is_error and result.content != threading.current_thread().name
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == function.SYNC_THREADS + 1
        assert "'hang' in 'fn' timed out" in warnings[-1] and "still runs" in warnings[-1]
    finally:
        release.set()
        await src.aclose()


async def test_hung_sync_calls_leave_queued_calls_a_thread():
    # Calls queued behind hung ones (all threads busy) run once the hung ones time out.
    from swarm.tools.function import ToolThreads

    release = threading.Event()
    threads = ToolThreads(size=2)
    try:
        hung = [threads.submit(lambda: release.wait(60)) for _ in range(2)]
        queued = threads.submit(lambda: "ran")
        assert [threads.abandon(c) for c in hung] == [1, 2]
        assert queued.future.result(timeout=30) == "ran"
        release.set()
        for c in hung:
            assert c.future.result(timeout=30) is True
    finally:
        release.set()
        threads.close()


def test_a_hung_sync_call_does_not_hold_up_the_process_exit(tmp_path):
    # A timed-out call that never returns: the process still exits when it is done.
    script = tmp_path / "hung.py"
    script.write_text(
        "import asyncio, time\n"
        "from swarm.errors import ToolError\n"
        "from swarm.tools.function import FunctionToolSource\n"
        "from swarm.tools.interface import ToolContext\n"
        "def hang() -> str:\n"
        "    '''Never return.'''\n"
        "    while True:\n"
        "        time.sleep(1)\n"
        "async def main():\n"
        "    src = FunctionToolSource('fn', [hang], timeout_s=0.2)\n"
        "    try:\n"
        "        await src.call('hang', {}, ToolContext(task_id='t', agent='a'))\n"
        "    except ToolError as e:\n"
        "        print('tool error:', e)\n"
        "asyncio.run(main())\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(script)], cwd=root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(root)})
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the process did not exit: a hung tool thread held it") from None
    assert proc.returncode == 0, out
    assert "tool error: tool 'hang' in 'fn' timed out after 0.2s" in out
