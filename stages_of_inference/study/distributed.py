"""The study on a Ray cluster: ``run_study(..., engine="ray")`` and ``stages-of-inference run --ray``.

The driver (this process) loads no model. The study's plan (:mod:`stages_of_inference.study.tasks`)
runs on actors, each one model on one device (it loads the model and draws its token batch once,
then runs every task it is given for that model with the task function every runner uses); at
most ``workers`` actors live at once: a model's actors start when it has work and a free slot,
and stop when it has none left, so several models share a cluster and several small models share
a GPU (``gpus_per_worker`` below 1). The books (what is left out, reused, stored, ready, finished)
are the engine's :class:`~stages_of_inference.study.engine.Driver`, as in a one-process study.

Every finished task's tables come back to the driver as Parquet bytes (data, never pickled
objects; Ray itself moves the actors' code between processes with cloudpickle, within the
cluster you run) and are stored atomically in the study folder's private task store under their
content address before anything else happens, so a driver started again skips every stored task.
A worker that dies during a task (killed, out of memory, its node lost) is replaced and the task
run again, up to ``max_retries`` times; then the study stops with an error naming the task. An
exception raised inside a task (bad input, a bug) is not retried: it stops the study, naming the
task. Each analysis is finished and saved as soon as its tasks are in; at the end the task
results are removed: the study folder then holds what a one-process study writes.

Ray is an optional dependency (``pip install 'stages-of-inference[ray]'``); importing this module
does not import it.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from stages_of_inference.results import Result
from stages_of_inference.study.config import StudyConfig
from stages_of_inference.study.engine import Driver
from stages_of_inference.study.folder import StudyFolder
from stages_of_inference.study.identity import ModelIdentity
from stages_of_inference.study.registry import Study
from stages_of_inference.study.tasks import ModelWorker, Task, decode_result, encode_result, study_tasks

__all__ = ["RayOptions", "TaskFailedError", "run_on_ray"]


class TaskFailedError(RuntimeError):
    """A task of a distributed study failed: its worker died more often than allowed, or the task
    raised an exception.
    """


@dataclass(frozen=True)
class RayOptions:
    """How a study runs on Ray.

    Attributes:
        address: ``None`` starts a local Ray cluster with this machine's cores (stopped at the end);
            ``"auto"`` joins the cluster running on this machine; ``"host:port"`` joins that
            cluster's head (reached within ``connect_timeout_s`` or refused in one line).
        workers: actors alive at once (each one model on one device); ``None``: as many as the
            cluster's GPUs allow (with ``gpus_per_worker``), else its CPUs (``cpus_per_worker``).
        cpus_per_worker: CPUs each actor reserves (and its torch threads).
        gpus_per_worker: GPUs each actor reserves: 1, or a fraction for small models sharing a
            GPU; ``None``: 1 where the cluster has GPUs and the study's device is not ``"cpu"``, else 0.
        shards: shards of each split analysis' batch (``None``: ``workers``). Task results are
            addressed by shard, so a restart reuses them only with the same number of shards.
        max_retries: runs of a task again after its worker died, before the study stops.
        connect_timeout_s: how long to wait for a cluster's head to answer.

    Example:
        >>> RayOptions().shards_for(2), RayOptions(shards=8).shards_for(2)
        (2, 8)
        >>> RayOptions(workers=0)
        Traceback (most recent call last):
        ...
        ValueError: workers must be a positive number of actors or None (as many as the cluster allows), got 0
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int | float = 1.0
    gpus_per_worker: int | float | None = None
    shards: int | None = None
    max_retries: int = 2
    connect_timeout_s: int | float = 30.0

    def __post_init__(self) -> None:
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise ValueError(f"address must be None (a local cluster), 'auto' or 'host:port', got {self.address!r}")
        for name in ("workers", "shards"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive number of {'actors' if name == 'workers' else 'shards'} "
                                 f"or None ({'as many as the cluster allows' if name == 'workers' else 'one per worker'}), "
                                 f"got {value!r}")
        if not isinstance(self.cpus_per_worker, (int, float)) or not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be a positive number of CPUs, got {self.cpus_per_worker!r}")
        if self.gpus_per_worker is not None and (not isinstance(self.gpus_per_worker, (int, float))
                                                 or self.gpus_per_worker < 0):
            raise ValueError(f"gpus_per_worker must be 0, a fraction of a GPU, whole GPUs or None, got {self.gpus_per_worker!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be a whole number of retries (0 or more), got {self.max_retries!r}")
        if not isinstance(self.connect_timeout_s, (int, float)) or not self.connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be a positive number of seconds, got {self.connect_timeout_s!r}")

    def shards_for(self, workers: int) -> int:
        """The number of shards with ``workers`` actors."""
        return self.shards or workers


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray engine needs Ray: pip install 'stages-of-inference[ray]'") from None
    return ray


def _check_reachable(address: str, timeout_s: float) -> None:
    """A ``host:port`` head that does not answer within ``timeout_s`` is refused in one line."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("ray://")
    if not host or not port.isdigit():
        raise ValueError(f"a Ray address is 'auto' or 'host:port' (e.g. 10.0.0.5:6379), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise ConnectionError(f"no Ray head answers at {address} within {timeout_s:g} s ({error.strerror or error}); "
                              "start one (ray start --head) or give its address") from None


def _connect(ray: Any, options: RayOptions, say: Callable[[str], None]) -> bool:
    """Join or start a cluster; True when this call started Ray here (and must stop it)."""
    if ray.is_initialized():
        say("ray: using the Ray session already started in this process")
        return False
    if options.address is None:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        say(f"ray: started a local cluster with {os.cpu_count()} CPUs")
    else:
        if options.address != "auto":
            _check_reachable(options.address, options.connect_timeout_s)
        ray.init(address=options.address, log_to_driver=False, configure_logging=False)
        say(f"ray: joined the cluster at {options.address}")
    return True


class _Worker:
    """The actor: one model of the study on one device (:class:`~stages_of_inference.study.tasks.ModelWorker`)."""

    def __init__(self, config_json: str, name: str, threads: int, work_root: str | None = None) -> None:
        torch.set_num_threads(max(1, threads))
        self.worker = ModelWorker(StudyConfig.from_json(config_json), name, work_root=work_root)

    def identity(self) -> dict[str, Any]:
        return {"identity": self.worker.identity.to_dict(), **self.worker.where()}

    def run(self, task: dict[str, Any], needs: dict[str, dict[str, bytes]]) -> dict[str, bytes]:
        done = {name: decode_result(blob) for name, blob in needs.items()}
        return encode_result(self.worker.run(Task.from_dict(task), done))


@dataclass
class _Actor:
    """A live actor of the runner: its model, its handle, its process once known, its task."""

    model: str
    handle: Any
    pid: int | None = None
    task: Task | None = None


class _RayRunner:
    """Runs a study's tasks on Ray actors, the books kept by the engine's
    :class:`~stages_of_inference.study.engine.Driver` (one per run).
    """

    def __init__(self, ray: Any, config: StudyConfig, folder: StudyFolder, options: RayOptions, on_mismatch: str,
                 say: Callable[[str], None]) -> None:
        self.ray, self.config, self.folder, self.options, self.say = ray, config, folder, options, say
        resources = ray.cluster_resources()
        gpus = options.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if resources.get("GPU", 0) > 0 and config.device != "cpu" else 0.0
        self.gpus = float(gpus)
        for kind, asked in (("CPU", options.cpus_per_worker), ("GPU", self.gpus)):
            if asked > resources.get(kind, 0):  # such an actor would wait forever for a place
                raise ValueError(f"each worker asks for {asked:g} {kind}, and the cluster has {resources.get(kind, 0):g}: "
                                 f"ask for less ({'--cpus-per-worker' if kind == 'CPU' else '--gpus-per-worker'})")
        fit = int(resources.get("GPU", 0) // self.gpus) if self.gpus > 0 else int(resources.get("CPU", 1) // options.cpus_per_worker)
        self.capacity = options.workers or max(1, fit)
        self.n_shards = options.shards_for(self.capacity)
        tasks = study_tasks(config, self.n_shards)
        self.driver = Driver(config, folder, tasks, on_mismatch=on_mismatch, say=say)
        self.identities: dict[str, dict[str, Any]] = {}
        self.actors: dict[Any, _Actor] = {}  # ObjectRef in flight -> its actor
        self.idle: list[_Actor] = []
        self.retries: Counter[Task | str] = Counter()
        self.to_run = 0
        self.returned = 0
        self.cls = ray.remote(_Worker)
        say(f"ray: {len(tasks)} tasks ({max(t.n_shards for t in tasks)} shards of each split analysis) on up to "
            f"{self.capacity} workers of {options.cpus_per_worker:g} CPU{'s' if options.cpus_per_worker != 1 else ''}"
            + (f" and {self.gpus:g} GPU" if self.gpus else ""))

    # ------------------------------------------------------------------ the loop
    def run(self) -> Study:
        while True:
            self._dispatch()
            if not self.actors:
                break
            ready, _ = self.ray.wait(list(self.actors), num_returns=1)
            ref = ready[0]
            actor = self.actors.pop(ref)
            self._collect(ref, actor)
        waiting = self.driver.unfinished()
        if waiting:  # cannot happen unless a needed analysis never finished
            raise TaskFailedError(f"{len(waiting)} task(s) could not start, e.g. {waiting[0]}")
        for actor in self.idle:
            self._kill(actor)
        return self.driver.study()

    def _collect(self, ref: Any, actor: _Actor) -> None:
        from ray.exceptions import RayActorError, RayTaskError  # Ray stays an optional dependency

        task = actor.task
        try:
            value = self.ray.get(ref)
        except RayActorError as error:
            self._died(actor, task, error)
            return
        except RayTaskError as error:
            cause = error.cause if isinstance(getattr(error, "cause", None), Exception) else error
            if task is None:  # the model did not load: its own error, as a one-process study raises it
                raise cause from None
            raise TaskFailedError(f"{task.label} raised {type(cause).__name__}: {str(cause).splitlines()[0]}") from None
        actor.task = None
        if task is None:
            actor.pid = int(value["pid"])
            self._identified(actor.model, value)
        else:
            self._returned(task, decode_result(value), actor)
        self.idle.append(actor)

    def _died(self, actor: _Actor, task: Task | None, error: Exception) -> None:
        """A worker process died: replace it (a new actor starts when a slot is free) and run its task again."""
        key: Task | str = task if task is not None else actor.model
        self.retries[key] += 1
        what = task.label if task is not None else f"loading {actor.model}"
        reason = str(error).splitlines()[0][:200]
        if self.retries[key] > self.options.max_retries:
            raise TaskFailedError(f"{what}: its worker died {self.retries[key]} times (max_retries "
                                  f"{self.options.max_retries}); last: {reason}")
        self.say(f"  {what}: worker pid {actor.pid} died; run again on a new worker "
                 f"(retry {self.retries[key]} of {self.options.max_retries})")
        self._kill(actor)
        if task is not None:
            self.driver.requeue(task)

    def _kill(self, actor: _Actor) -> None:
        try:
            self.ray.kill(actor.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    # ------------------------------------------------------------------ bookkeeping
    def _identified(self, name: str, info: dict[str, Any]) -> None:
        """A model's actor reported what it loaded: the first one's identity addresses the
        model's tasks; every later one must hold the same model and text.
        """
        identity = ModelIdentity.from_dict(info["identity"])
        known = self.identities.get(name)
        if known is not None:
            difference = ModelIdentity.from_dict(known["identity"]).differs(identity)
            if difference is not None:
                raise TaskFailedError(f"two workers of {name} disagree on its model or text ({difference}; on "
                                      f"{known['host']} and {info['host']}): install the same model and versions on "
                                      "every node")
            return
        self.identities[name] = info
        self.say(f"{name}: {identity.n_layers} blocks, loaded in {info['load_seconds']:.0f} s on {info['host']} "
                 f"(pid {info['pid']})")
        pending = self.driver.identified(name, identity)
        self.to_run += len(pending)
        self.say(f"{name}: {len(pending)} tasks to run")

    def _returned(self, task: Task, result: Result, actor: _Actor) -> None:
        self.driver.returned(task, result)  # stored first: a driver stopped after this line loses nothing
        self.returned += 1
        running = sum(1 for a in self.actors.values() if a.task is not None)
        self.say(f"  {task.label}: {result.provenance['task']['seconds']:.1f} s on worker pid {actor.pid} "
                 f"[{self.returned} of {self.to_run} tasks done, {running} running, "
                 f"{sum(self.retries.values())} failed and run again]")

    # ------------------------------------------------------------------ placing work
    def _dispatch(self) -> None:
        """Give idle actors ready tasks of their model, stop the ones with nothing left, start new ones."""
        for actor in list(self.idle):
            ready = self.driver.ready(actor.model)
            if ready:
                self.idle.remove(actor)
                self._submit(actor, ready[0])
            elif not self.driver.models[actor.model].pending:
                self.idle.remove(actor)
                self._kill(actor)
        while self._live() < self.capacity:
            name = self._wanting()
            if name is None:
                break
            handle = self.cls.options(num_cpus=self.options.cpus_per_worker, num_gpus=self.gpus).remote(
                self.config.to_json(), name, int(self.options.cpus_per_worker), str(self.folder.work))
            self.actors[handle.identity.remote()] = _Actor(name, handle)

    def _live(self) -> int:
        return len(self.actors) + len(self.idle)

    def _wanting(self) -> str | None:
        """The first model (in the study's order) that could use one more actor."""
        for name, state in self.driver.models.items():
            if not state.tasks:
                continue
            mine = [a for a in (*self.actors.values(), *self.idle) if a.model == name]
            if name not in self.identities:
                if not mine:
                    return name
                continue
            if len(self.driver.ready(name)) > sum(1 for a in mine if a.task is None):
                return name
        return None

    def _submit(self, actor: _Actor, task: Task) -> None:
        self.driver.started_task(task)
        needs = {n: encode_result(r) for n, r in self.driver.needs_of(task).items()}
        actor.task = task
        self.actors[actor.handle.run.remote(task.to_dict(), needs)] = actor
        self.say(f"  {task.label}: started on worker pid {actor.pid}")


def run_on_ray(config: StudyConfig, folder: StudyFolder, options: RayOptions, *, on_mismatch: str = "recompute",
               say: Callable[[str], None] = print) -> Study:
    """Run the study ``config`` on Ray into ``folder`` (held by the caller) and finish it there
    (the caller writes ``study.json`` and the report). Returns the finished study.
    """
    ray = _import_ray()
    started = time.perf_counter()
    own = _connect(ray, options, say)
    try:
        study = _RayRunner(ray, config, folder, options, on_mismatch, say).run()
    finally:
        if own:
            ray.shutdown()
    say(f"ray: every task done in {time.perf_counter() - started:.0f} s")
    return study
