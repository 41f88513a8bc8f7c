"""Bringing a swarm up on a Ray cluster and taking it down: Serve model apps plus named actors."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
from typing import Any

from swarm._net import connect_problem, free_port, listen_problem
from swarm.config import ScriptedModelConfig, SwarmConfig
from swarm.errors import ConfigError, OrchestrationError, SwarmNotFound, UserError
from swarm.models.ingress import default_direct_ingress_env
from swarm.runtime.supervisor_actor import (
    ActorName,
    SupervisorActor,
    agent_actor_name,
    create_agents,
    supervisor_actor_name,
)

log = logging.getLogger(__name__)

NAMESPACE = "swarm"
DEFAULT_SERVE_PORT = 8000

# Ray settings that recovery depends on. When an actor's worker dies under a call, the caller
# waits up to `timeout_ms_task_wait_for_death_info` (1 s by default) for the GCS to say why
# before it sees the error, and only then can the supervisor resume the turn; and the caller
# looks at the calls waiting so only on its internal heartbeat (`core_worker_internal_
# heartbeat_ms`, 1 s by default). 100 ms each: the actor-kill recovery went from about 1 s to
# about 0.4 s (BENCHMARKS.md). A long-lived cluster gets them from `ray start --system-config`
# (README). `ray.init` adds its own keys to the dict it is given: pass it a copy.
RAY_SYSTEM_CONFIG: dict[str, int] = {"timeout_ms_task_wait_for_death_info": 100,
                                     "core_worker_internal_heartbeat_ms": 100}


def ensure_ray(address: str | None = None, *, local_ok: bool = True) -> None:
    """Connect to Ray once: `address`, else `RAY_ADDRESS` (as under `ray job submit`), else local.

    With `local_ok=False` (long-lived deployments) a running cluster is required, since detached
    actors in a throwaway local cluster would vanish with this process.
    """
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target is None and not local_ok:
        target = "auto"
    try:
        if target:
            problem = _unreachable(target)
            if problem is not None:
                raise ConnectionError(problem)
            ray.init(address=target, namespace=NAMESPACE, log_to_driver=False)
        else:
            # Serve reads these when its processes start: models with `ingress: direct` are
            # then called on their replicas' own ports (swarm.models.ingress).
            default_direct_ingress_env()
            ray.init(
                address="local", namespace=NAMESPACE, log_to_driver=False,
                include_dashboard=False, _system_config=dict(RAY_SYSTEM_CONFIG),
            )
            _PRIVATE_RAY[0] = True
    except ConnectionError as exc:
        raise UserError(
            f"can't reach a Ray cluster at {target!r}: {str(exc).rstrip('.')}. Start one with "
            "`ray start --head` or set RAY_ADDRESS." + _auth_hint()
        ) from None


_PROBE_TIMEOUT_S = 5.0


def _unreachable(target: str) -> str | None:
    """Why nothing listens at an explicit cluster address (`host:port`, `ray://host:port`),
    or None (also for "auto" and "local", which Ray resolves itself). Checked first because
    `ray.init` with an address where nothing answers retries for minutes before it gives up."""
    address = target.removeprefix("ray://")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    host = host.strip("[]")
    problem = connect_problem(host, int(port), _PROBE_TIMEOUT_S)
    if problem is None:
        return None
    return f"nothing answers at {host}:{port} ({problem.strerror or problem})"


def _auth_hint() -> str:
    """What to try when a running cluster refused us: Ray clusters use token authentication
    by default (the token in ~/.ray/auth_token), which a client takes part in only with
    RAY_AUTH_MODE=token in its environment."""
    if os.environ.get("RAY_AUTH_MODE"):
        return ""
    return (" If the cluster is running, it may use Ray's token authentication (the default): "
            "`export RAY_AUTH_MODE=token` and try again.")


# Whether `ensure_ray` started a private local cluster for this process (`swarm run`).
_PRIVATE_RAY = [False]


def _on_head_node() -> bool:
    """Whether this driver runs on the cluster's head node (not through Ray Client)."""
    import ray

    try:
        if ray.util.client.ray.is_connected():
            return False
        here = ray.get_runtime_context().get_node_id()
        return any(n.get("NodeID") == here and "node:__internal_head__" in n.get("Resources", {})
                   for n in ray.nodes() if n.get("Alive"))
    except Exception:  # can't tell: don't refuse on a guess
        return False


def serve_port() -> int:
    """Start Ray Serve's HTTP proxy on loopback if needed; return the port it listens on.

    The port is `SWARM_SERVE_PORT` (default 8000). If Serve isn't running yet and another
    program holds that port (another Ray cluster's Serve, say), a private cluster (`swarm run`)
    takes a free port instead; otherwise it is a `UserError` naming the port, before Serve is
    started, so no proxy is left half-started on it.
    """
    from ray import serve
    from ray.serve.context import _get_global_client

    explicit = bool(os.environ.get("SWARM_SERVE_PORT"))
    try:
        wanted = int(os.environ.get("SWARM_SERVE_PORT") or DEFAULT_SERVE_PORT)
    except ValueError:
        raise UserError(f"SWARM_SERVE_PORT must be a port number, not "
                        f"{os.environ['SWARM_SERVE_PORT']!r}") from None
    host = os.environ.get("SWARM_SERVE_HOST", "127.0.0.1")
    # Internal API of Ray 2.60, kept in this one place: whether Serve runs, and its port. The
    # proxy runs on the head node: its port can be looked at from here only on that node.
    if _get_global_client(raise_if_no_controller_running=False) is None and \
            (_PRIVATE_RAY[0] or _on_head_node()) and \
            listen_problem(host or "0.0.0.0", wanted) is not None:
        if _PRIVATE_RAY[0] and not explicit:
            wanted = free_port(host or "0.0.0.0")
            log.info("port %d is taken; Ray Serve listens on %d for this run",
                     DEFAULT_SERVE_PORT, wanted)
        else:
            raise UserError(
                f"port {wanted} on {host or '0.0.0.0'} is in use by another program, so Ray "
                "Serve's HTTP proxy can't listen there; free it, or pick another port with "
                "SWARM_SERVE_PORT (swarm up: --a2a-port)")
    try:
        serve.start(http_options={"host": host, "port": wanted})
    except RuntimeError as exc:  # the proxy couldn't bind after all (taken meanwhile)
        if "bind" not in str(exc).lower():
            raise
        with contextlib.suppress(Exception):
            serve.shutdown()  # not left running with the options of a port it can't use
        raise UserError(f"Ray Serve's HTTP proxy can't listen on {host}:{wanted}: {exc}; "
                        "pick another port with SWARM_SERVE_PORT (swarm up: --a2a-port)"
                        ) from None
    # Serve keeps the options of its first start; ask the controller which port won.
    return int(_get_global_client().http_config.port)


def _app_name(deployment: str, model: str) -> str:
    return f"{deployment}-{model}"


def deploy_models(cfg: SwarmConfig, deployment: str) -> dict[str, str]:
    """Deploy the config's scripted and vllm models as Serve apps; return base URLs by name."""
    from ray import serve

    from swarm.models.scripted.serve import build_scripted_app

    endpoints: dict[str, str] = {}
    port: int | None = None
    for name, mcfg in cfg.models.items():
        if not isinstance(mcfg, ScriptedModelConfig) or mcfg.transport != "http":
            continue
        if port is None:
            port = serve_port()
        app = build_scripted_app(
            mcfg.policy_spec or {},
            model_name=name,
            latency=mcfg.latency,
            replicas=mcfg.replicas,
            max_ongoing_requests=mcfg.max_ongoing_requests,
            router=mcfg.router,
        )
        prefix = f"/{deployment}/{name}"
        serve.run(app, name=_app_name(deployment, name), route_prefix=prefix)
        endpoints[name] = f"http://127.0.0.1:{port}{prefix}/v1"
    from swarm.memory.serve import deploy_embedder

    endpoints.update(deploy_embedder(cfg, deployment))  # memory's embedding model, if used
    from swarm.models.vllm import deploy_vllm_models, vllm_models

    if vllm_models(cfg):
        endpoints.update(deploy_vllm_models(cfg, deployment, port or serve_port()))
    return endpoints


STORE_ENV = "SWARM_STATE_STORE"
# Embedded servers this process started, by deployment, so `swarm run` can stop its own.
_STARTED_HERE: dict[str, Any] = {}
# The agent replicas' handles, by deployment, of the swarms this process deployed: a replica
# that isn't detached lives while a handle to it exists (until `stop_swarm`).
_AGENTS_HERE: dict[str, dict[str, list[Any]]] = {}
# The supervisors' handles of those swarms, for the same reason: a caller of `start_swarm`
# that drops the handle it returned must not see the supervisor collected with it.
_SUPERVISORS_HERE: dict[str, Any] = {}


def stop_embedded_store(deployment: str) -> None:
    """Stop the embedded redis-server that deploying `deployment` started, if any.

    Its append-only file stays under the run directory, so the data is kept.
    """
    server = _STARTED_HERE.pop(deployment, None)
    if server is not None:
        server.stop()


def resolve_store(cfg: SwarmConfig) -> tuple[str | None, Any]:
    """The store URL every actor of this swarm opens, and the embedded server if one started.

    `SWARM_STATE_STORE` in the environment overrides the config's `state.store`. `embedded`
    starts (or reuses) a private redis-server under the run directory. The store is checked
    here, so an unreachable one is a clear error before anything is deployed.
    """
    from pathlib import Path

    from swarm.state import open_checkpointer, with_archive
    from swarm.state.embedded import EmbeddedRedis

    spec = os.environ.get(STORE_ENV) or cfg.state.store
    if os.environ.get(STORE_ENV):
        problem = store_env_problem()
        if problem is not None:
            raise UserError(problem)
    if spec == "none":
        return None, None
    if spec == "memory":
        raise UserError(
            "state.store 'memory' lives in one process; a deployed swarm needs 'embedded', "
            "'none' or a URL (memory is for swarm.testing.LocalSwarm)"
        )
    server = None
    if spec == "embedded":
        server = EmbeddedRedis.for_run_dir(Path(cfg.state.run_dir).resolve())
        server.start()
        spec = server.url
    if cfg.state.archive and "|" not in spec:
        # Every actor opens the store from this one string; a relative file:// archive is
        # taken from the working directory here, wherever the actors run.
        archive = cfg.state.archive
        if archive.startswith("file://") and not archive.startswith("file:///"):
            archive = Path(archive[len("file://"):]).resolve().as_uri()
        spec = with_archive(spec, archive, cfg.state.archive_after)

    async def check() -> None:
        try:
            store = open_checkpointer(spec, run_dir=Path(cfg.state.run_dir),
                                      outage_timeout_s=cfg.state.outage_timeout_s)
        except ValueError as exc:  # a spec the config's schema let through, or the env's
            raise UserError(str(exc)) from None
        try:
            await store.start()
        finally:
            await store.close()

    _run_apart(check())
    return spec, server


def store_env_problem() -> str | None:
    """What is wrong with `SWARM_STATE_STORE`, if it is set: it is checked as `state.store`
    is, since it overrides it."""
    spec = os.environ.get(STORE_ENV)
    if not spec:
        return None
    from swarm.config import StateConfig

    try:
        StateConfig(store=spec.partition("|")[0].strip())
    except ValueError as exc:  # pydantic's ValidationError is one
        why = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
        return f"{STORE_ENV} (which overrides it): {why.removeprefix('Value error, ')}"
    return None


def preflight(cfg: SwarmConfig) -> None:
    """Checks that need code, not just the schema: function tools import and have schemas,
    and `provider: python` models import and build.

    Raises `ConfigError` naming the field, so a bad import path is caught before anything is
    deployed (and by `swarm validate`), not as a crash inside an agent actor.
    """
    from swarm.config import PythonModelConfig
    from swarm.tools.function import FunctionToolSource

    problem = store_env_problem()  # it stands for state.store
    if problem is not None:
        raise ConfigError([("state.store", problem)])
    for name, tcfg in cfg.tools.items():
        if tcfg.python is not None:
            FunctionToolSource(name, tcfg.python, timeout_s=tcfg.timeout_s)
    for name, mcfg in cfg.models.items():
        if isinstance(mcfg, PythonModelConfig):
            _run_apart(_check_model(name, mcfg))


async def _check_model(name: str, cfg: Any) -> None:
    """Build a `provider: python` model as a replica does (on a running event loop), then
    close it: it was only built to be checked. A failing close is the model's to fix, not a
    config error: it is logged."""
    from swarm.models import build_python_model

    model = build_python_model(name, cfg)
    try:
        closing = model.aclose()
        if inspect.isawaitable(closing):
            await closing
    except Exception:
        log.warning("model %s: closing it after the config check failed", name, exc_info=True)


def _run_apart(coro: Any) -> Any:
    """Run a coroutine to its end from sync code, in a thread of its own when this thread
    already runs an event loop (a notebook), where `asyncio.run` would refuse."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def root_cause(exc: BaseException) -> BaseException:
    """The exception an actor raised, out of the `RayTaskError`s (one per actor call it went
    through) that carried it."""
    seen = 0
    while seen < 16:
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            return exc
        exc, seen = cause, seen + 1
    return exc


def start_swarm(
    cfg: SwarmConfig,
    *,
    deployment: str | None = None,
    detached: bool = False,
    ready_timeout: float = 120.0,
) -> tuple[Any, list[dict[str, Any]]]:
    """Deploy models and actors; return the supervisor handle and each replica's ready report."""
    import ray

    deployment = deployment or cfg.name
    if not re.match(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$", deployment):
        raise UserError(f"invalid deployment name {deployment!r}")
    try:
        ray.get_actor(supervisor_actor_name(deployment), namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise UserError(
            f"a swarm named {deployment!r} is already running; take it down with "
            f"`python -m swarm down {deployment}` first"
        )
    preflight(cfg)
    if cfg.a2a.serve:
        serve_port()  # its port held by another program: said now, before anything deploys
    if cfg.remote_agents():
        from swarm.protocol.a2a_member import check_cards

        _run_apart(check_cards(cfg))  # a remote member's bad card stops it here: ConfigError
    from swarm.observability.usage import pin_location

    cfg = pin_location(cfg)  # every actor writes the usage ledger to the same place
    from swarm.memory.service import pin_memory_location

    cfg = pin_memory_location(cfg)  # and opens the same long-term memory
    store_spec, server = resolve_store(cfg)
    if server is not None and server.started_here:
        _STARTED_HERE[deployment] = server
    endpoints = deploy_models(cfg, deployment)
    # The agent replicas first, from this process, so that they are this process's: not
    # detached, an actor dies with the process that created it, and replicas the supervisor
    # created died with the supervisor, the turns they ran too. Created here, they outlive a
    # supervisor crash (the restarted supervisor finds them by name and joins their running
    # turns) and still end with this process (`swarm run`). They look the supervisor up by
    # name when it first calls them.
    _AGENTS_HERE[deployment] = create_agents(
        cfg, deployment, NAMESPACE, detached, endpoints,
        ActorName(supervisor_actor_name(deployment), NAMESPACE), store_spec)
    sup = (
        ray.remote(SupervisorActor)
        .options(
            name=supervisor_actor_name(deployment),
            namespace=NAMESPACE,
            lifetime="detached" if detached else None,
            max_restarts=-1,
            max_concurrency=10_000,
            num_cpus=0,
            enable_task_events=cfg.process.ray_task_events,
        )
        .remote(cfg, endpoints, deployment, NAMESPACE, detached, store_spec)
    )
    if not detached:
        _SUPERVISORS_HERE[deployment] = sup  # held until `stop_swarm` (or this process ends)
    try:
        reports = ray.get(sup.ready.remote(), timeout=ready_timeout)
    except Exception as exc:
        # Leave nothing half-deployed behind.
        try:
            stop_swarm(deployment, timeout=10)
        except Exception:
            log.debug("cleanup of %s failed", deployment, exc_info=True)
        _kill_agents(deployment)  # if the supervisor couldn't say which there are
        cause = root_cause(exc)
        if isinstance(cause, (ConfigError, UserError)):
            raise cause from None  # a config the cluster found wrong: said as it is
        if isinstance(exc, ray.exceptions.GetTimeoutError):
            raise OrchestrationError(
                f"swarm {deployment!r} did not start within {ready_timeout:g} s") from None
        raise OrchestrationError(
            f"swarm {deployment!r} failed to start: {type(cause).__name__}: {cause}"
        ) from None
    if cfg.a2a.serve:
        _start_a2a(cfg, deployment)
    return sup, reports


def _kill_agents(deployment: str) -> None:
    """Kill the agent replicas this process created for `deployment`, if it still holds them."""
    import ray

    for handles in _AGENTS_HERE.pop(deployment, {}).values():
        for handle in handles:
            try:
                ray.kill(handle)
            except Exception:
                log.debug("killing an agent of %s failed", deployment, exc_info=True)


def _start_a2a(cfg: SwarmConfig, deployment: str) -> None:
    """Run the swarm's A2A app (swarm.protocol.a2a_server); a failure takes the swarm down."""
    from swarm.errors import SwarmError
    from swarm.protocol.a2a_server.app import deploy_a2a

    try:
        deploy_a2a(cfg, deployment)
    except Exception as exc:
        try:
            stop_swarm(deployment, timeout=10)
        except Exception:
            log.debug("cleanup of %s failed", deployment, exc_info=True)
        if isinstance(exc, SwarmError):
            raise
        raise OrchestrationError(f"the A2A app of swarm {deployment!r} did not start: "
                                 f"{type(exc).__name__}: {exc}") from None


def stop_swarm(deployment: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """Take a deployed swarm down: agents, supervisor, model apps and its A2A app. Returns
    the supervisor's `info`, with "unfinished" (tasks not finished when it went down) and
    "resumable" (whether a durable store keeps them for the next `start_swarm` of the same
    name, which resumes them)."""
    import ray
    from ray import serve

    try:
        sup = ray.get_actor(supervisor_actor_name(deployment), namespace=NAMESPACE)
    except ValueError:
        raise SwarmNotFound(f"no swarm named {deployment!r} is running") from None
    from swarm.client import SwarmClient, _call

    info = _call(SwarmClient(deployment, sup), "info", timeout=timeout)
    try:
        info |= ray.get(sup.shutdown.remote(), timeout=timeout) or {}
    except Exception:
        log.warning("swarm %s did not shut down cleanly", deployment, exc_info=True)
    for role, replicas in info["agents"].items():
        for i in range(replicas):
            try:
                ray.kill(ray.get_actor(agent_actor_name(deployment, role, i), namespace=NAMESPACE))
            except ValueError:
                pass
    _AGENTS_HERE.pop(deployment, None)
    _SUPERVISORS_HERE.pop(deployment, None)
    ray.kill(sup)
    for model in info["endpoints"]:
        serve.delete(_app_name(deployment, model))
    from swarm.protocol.a2a_server.app import undeploy_a2a

    undeploy_a2a(deployment)
    return info
