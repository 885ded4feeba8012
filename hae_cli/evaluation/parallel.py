"""Where the items run: in this process, in local worker processes, or in Ray actors. Each
worker loads the model once (`ItemRunner`) and is fed items one at a time; its results come
back here as they finish, in whatever order, and only this process writes them.

Every backend runs the same `ItemRunner.run`, greedily, with the same torch thread count (1
unless told), so an item's result does not depend on which one ran it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from hae_cli.errors import ConfigError, HaeError
from hae_cli.evaluation.records import Item
from hae_cli.evaluation.runner import EvalConfig, ItemRunner

LOCAL = "local"  # --ray local: a Ray instance started for the run, on this machine
RAY_OBJECT_STORE = 256 * 2**20  # a local instance's shared memory: the items and results are small


class WorkerError(HaeError):
    """A worker could not start (the model failed to load there): its one line."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Backend:
    """How many workers, with how many torch threads each, and where: `ray` None (this machine's
    processes; 1 worker runs in this process), `"local"` (a Ray instance started here) or a
    cluster's address (`"auto"`: the one this machine belongs to)."""

    workers: int | None = None  # None: 1 here; under Ray, as many as the cluster has room for
    threads: int = 1  # torch threads per worker (this process's too, when it is the worker)
    ray: str | None = None

    def fitted(self, items: int, model: str) -> tuple[Backend, str | None]:
        """This backend with its workers and threads capped by what the run can use: no more
        workers than items to run, nor (on this machine) than its cores (at `threads` each) and
        its available memory hold; no more threads than cores. With the one-line note of what was
        used, when anything was capped (None otherwise)."""
        cores = usable_cores()
        threads = min(self.threads, cores) if self.ray is None else self.threads  # Ray's nodes have their own
        limits = f"{items} item{'s' if items != 1 else ''} to run"
        if self.ray is not None or (self.workers or 1) == 1:
            workers = min(self.workers, max(1, items)) if self.workers else self.workers
            limits += f", {cores} core{'s' if cores != 1 else ''} here" if self.ray is None else ""
        else:
            from hae_cli.units import format_bytes

            worker_bytes = memory_per_worker(model)
            available = _available_memory()
            workers = max(1, min(self.workers, items, cores // threads, available // worker_bytes))
            limits += (f", {cores} core{'s' if cores != 1 else ''} at {threads} thread{'s' if threads != 1 else ''} "
                       f"each, {format_bytes(available)} of memory available at about {format_bytes(worker_bytes)} "
                       "a worker")
        if workers == self.workers and threads == self.threads:
            return self, None
        said = []
        if workers != self.workers:
            said.append(f"--workers {self.workers}: running {workers}")
        if threads != self.threads:
            said.append(f"--threads {self.threads}: using {threads}")
        return replace(self, workers=workers, threads=threads), f"{'; '.join(said)} ({limits})"

    def describe(self) -> str:
        if self.ray is not None:
            return f"ray {self.ray}"
        return f"{self.workers or 1} local worker{'s' if (self.workers or 1) > 1 else ''}"


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container or `taskset` narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def memory_per_worker(model: str) -> int:
    """About what one worker process holds: what this process holds now (Python, torch and
    transformers imported) plus the checkpoint's weights as they lie on disk."""
    import psutil

    return int(psutil.Process().memory_info().rss) + weights_bytes(model)


def weights_bytes(model: str) -> int:
    """The size of a checkpoint's weight files ("demo", a folder, or a hub id already in the
    local Hugging Face cache; 0 where it cannot be found without the network)."""
    from hae_cli.checks import model_files

    files = model_files(model)
    if not files and "/" in model and not Path(model).expanduser().exists():
        try:
            from huggingface_hub import snapshot_download

            files = model_files(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache: the load will say so
            files = []
    total = 0
    for _, path in files:
        if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            try:
                total += path.stat().st_size
            except OSError:
                pass
    return total


def run_items(items: Iterable[Item], config: EvalConfig, backend: Backend, loaded=None) -> Iterator[dict]:
    """Each item's result (`ItemRunner.run`) as it finishes. `loaded`: a model already loaded
    here, for the in-process backend. A worker that could not load the model ends the run with
    its error (`WorkerError`). Nothing to run starts no worker."""
    items = list(items)
    if not items:
        return
    if backend.ray is not None:
        results = _ray_actors(items, config, backend)
    elif (backend.workers or 1) > 1:
        results = _local_processes(items, config, backend.workers, backend.threads)
    else:
        runner = ItemRunner(config, loaded=loaded, threads=backend.threads)
        results = (runner.run(item) for item in items)
    for result in results:
        if "fatal" in result:
            raise WorkerError(result["fatal"], result.get("exit_code", 2))
        yield result


def check_ray(address: str | None = None) -> None:
    """Ray is an optional extra: say how to get it; and where `address` names a cluster, that
    something answers there. Both before anything loads or is written."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError("--ray needs Ray, an optional extra: pip install 'hae-cli[ray]' (or pip install ray)") from None
    if address is not None and address != LOCAL:
        _check_cluster(address)


# --------------------------------------------------------------------------- the workers' side


_RUNNER: ItemRunner | None = None
_FAILED: dict | None = None


def start_worker(config: EvalConfig, threads: int | None) -> None:
    """A worker's one model load; a failure is kept and handed back with the first item."""
    global _RUNNER, _FAILED
    _quiet_libraries()
    try:
        _RUNNER = ItemRunner(config, threads=threads)
    except HaeError as error:
        _FAILED = {"fatal": str(error), "exit_code": error.exit_code}


def run_item(item: Item) -> dict:
    if _FAILED is not None:
        return {"id": item.id, **_FAILED}
    return _RUNNER.run(item)


def _quiet_libraries() -> None:
    """transformers' notices off in a worker, as `hae` has them (a TRANSFORMERS_VERBOSITY set by the user wins)."""
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


# --------------------------------------------------------------------------- local processes


def _local_processes(items: Iterable[Item], config: EvalConfig, workers: int, threads: int) -> Iterator[dict]:
    """`workers` spawned processes (no fork after torch has started threads), fed one item at a
    time through the pool's queue."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with _no_ctrl_c_in_children():
        pool = context.Pool(workers, initializer=_start_local_worker, initargs=(config, threads))
    with pool:
        yield from pool.imap_unordered(run_item, items, chunksize=1)


class _no_ctrl_c_in_children:  # noqa: N801 (a context manager, named as what it does)
    """While the pool starts its processes, Ctrl-C is ignored here, so each child starts with it
    ignored (an ignored signal stays ignored across exec): a Ctrl-C while a worker is still
    importing torch stops the run in this process alone, with no traceback from each worker.
    This process takes Ctrl-C again as soon as the processes are started."""

    def __enter__(self):
        import signal

        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _start_local_worker(config: EvalConfig, threads: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool
    _exit_with_parent()
    start_worker(config, threads)


def _exit_with_parent() -> None:
    """A worker whose parent was killed (SIGKILL: no chance to stop its pool) ends too, instead
    of waiting on the pool's queue for ever."""
    import multiprocessing
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


# --------------------------------------------------------------------------- Ray


class _Actor:
    """A Ray actor holding a loaded model (on its own GPU, or its CPU slots)."""

    def __init__(self, config: EvalConfig, threads: int) -> None:
        start_worker(config, threads)

    def run(self, item: Item) -> dict:
        return run_item(item)


def _ray_actors(items: Iterable[Item], config: EvalConfig, backend: Backend) -> Iterator[dict]:
    """Ray actors fed the items by Ray's `ActorPool`, each image shipped with its item (the
    nodes need not share a file system)."""
    check_ray()
    import ray
    from ray.util import ActorPool

    threads = backend.threads
    started = not ray.is_initialized()
    if started:
        _ray_init(ray, backend, threads)
    actors = []
    try:
        resources = ray.cluster_resources()
        wants_gpu = config.device is None or config.device.startswith("cuda")
        gpus = int(resources.get("GPU", 0)) if wants_gpu else 0
        count = backend.workers or max(1, gpus or int(resources.get("CPU", 1) // threads))
        remote = ray.remote(num_cpus=threads, num_gpus=1 if gpus else 0)(_Actor)
        actors = [remote.remote(config, threads) for _ in range(count)]
        pool = ActorPool(actors)
        yield from pool.map_unordered(lambda actor, item: actor.run.remote(_shipped(item)), list(items))
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _ray_init(ray, backend: Backend, threads: int) -> None:
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if backend.ray == LOCAL:
        cpus = (backend.workers or os.cpu_count() or 1) * threads
        # address="local": a new instance even where `ray start` once left a cluster's address behind
        ray.init(address="local", num_cpus=cpus, object_store_memory=RAY_OBJECT_STORE, **quiet)
        return
    _check_cluster(backend.ray)
    try:
        ray.init(address=backend.ray, **quiet)
    except ConnectionError as error:
        raise ConfigError(_no_cluster(backend.ray, f"({' '.join(str(error).split())[:160]})")) from None


def _no_cluster(address: str, why: str) -> str:
    return f"--ray {address}: no Ray cluster answers {why}; start one with `ray start --head`, or use --ray local"


def _check_cluster(address: str) -> None:
    """Something answers where `address` points, told in seconds (Ray itself would retry for minutes)."""
    try:
        where = _cluster_address(address)
    except (ConnectionError, ValueError) as error:
        raise ConfigError(_no_cluster(address, f"({' '.join(str(error).split())[:160]})")) from None
    written = address.removeprefix("ray://")
    if where is None or _answers(where) or (written != where and _answers(written)):
        return
    if address == "auto":
        at = f"at {where} (the cluster this machine last joined, or RAY_ADDRESS)"
    elif written != where:
        at = f"at {written} (nor at {where}, the address Ray makes of it)"
    else:
        at = f"at {where}"
    raise ConfigError(_no_cluster(address, at))


def _cluster_address(address: str) -> str | None:
    """HOST:PORT of the cluster `address` names ("auto": the one `ray start` recorded on this
    machine, or RAY_ADDRESS), or None when it cannot be told before connecting. Ray itself
    retries an address where nothing listens for minutes, printing as it goes."""
    if address.startswith("ray://"):
        return address.removeprefix("ray://")
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # a Ray without it: let ray.init find out
        return None
    return canonicalize_bootstrap_address(address)


def _answers(address: str, timeout: float = 3.0) -> bool:
    """Something accepts a connection at HOST:PORT (the cluster's GCS, or a Ray Client server)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _shipped(item: Item) -> Item:
    """The item with its image files' bytes in place of their paths."""
    return replace(item, images=tuple(Path(i).read_bytes() if isinstance(i, str) else i for i in item.images))
