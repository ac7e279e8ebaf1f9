"""The one runner of a study: what every way of running it shares.

A study is planned as tasks (:func:`~stages_of_inference.study.tasks.study_tasks`: model x
analysis x shard) and each task is run by one function
(:meth:`~stages_of_inference.study.tasks.ModelWorker.run`). The :class:`Driver` here keeps the
books of a run, whatever runs the tasks:

* once a model's identity is known (its weights, its token batches, its backend), it leaves out
  what the backend cannot run, reuses each finished analysis whose fingerprint matches, takes
  each task result already stored, and lists the rest as pending;
* it hands out the tasks whose ``needs`` are finished, stores every task's result as soon as it
  comes (before anything else, so a run stopped after that loses nothing), and finishes an
  analysis (:func:`~stages_of_inference.study.finish.finish_analysis`) as soon as all its tasks
  and the analyses it needs and reads are in, saving it into the study folder;
* at the end it assembles the :class:`~stages_of_inference.study.registry.Study` in the study's
  order and places the stages.

What runs the tasks differs: :func:`run_in_process` here (one model loaded at a time, tasks in
the study's order: ``run_study``, and ``--shard`` with a slice of the plan), the Ray actors of
:mod:`~stages_of_inference.study.distributed`, or nothing at all (``merge``: every task result
is already stored).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stages_of_inference.results import Result
from stages_of_inference.study.config import StudyConfig
from stages_of_inference.study.finish import finish_analysis
from stages_of_inference.study.folder import StudyFolder, load_if_matching, model_stages, study_slugs
from stages_of_inference.study.identity import ModelIdentity, fingerprint
from stages_of_inference.study.registry import REGISTRY, Study, runs_on
from stages_of_inference.study.tasks import ModelWorker, Task, TaskStore, task_address

__all__ = ["ON_MISMATCH", "Driver", "run_in_process"]

ON_MISMATCH = ("recompute", "error")
"""What a run does with a finished analysis made with other settings."""


@dataclass
class _Model:
    """What the driver knows of one model of the study."""

    tasks: list[Task]
    identity: ModelIdentity | None = None
    pending: list[Task] = field(default_factory=list)
    parts: dict[str, dict[Task, Result]] = field(default_factory=dict)
    finished: dict[str, Result] = field(default_factory=dict)
    reused: set[str] = field(default_factory=set)
    left_out: set[str] = field(default_factory=set)
    seconds: dict[str, float] = field(default_factory=dict)


class Driver:
    """The books of one run of a study (module docstring).

    Args:
        config: the study's settings.
        folder: the study folder, held by the caller.
        tasks: the tasks this run is responsible for (the whole plan, or one shard's slice).
        on_mismatch: :data:`ON_MISMATCH`.
        say: where one line per step goes.
        save: finish every analysis of the study and save it into the folder (a study); ``False``:
            finish only what this run's tasks need, and save nothing there (a ``--shard`` run,
            whose output is its stored task results).
        stores: where stored task results are looked for besides the folder's own (the shard
            folders ``merge`` reads).
    """

    def __init__(self, config: StudyConfig, folder: StudyFolder, tasks: Sequence[Task], *, on_mismatch: str = "recompute",
                 say: Callable[[str], None] = print, save: bool = True, stores: Sequence[TaskStore] = ()) -> None:
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(f"on_mismatch must be 'recompute' or 'error', got {on_mismatch!r}")
        self.config, self.folder, self.on_mismatch, self.say, self.save = config, folder, on_mismatch, say, save
        self.store = TaskStore(folder.tasks)
        self.stores = [self.store, *stores]
        self.slugs = study_slugs(config.models)
        self.models = {m: _Model([t for t in tasks if t.model == m]) for m in config.models}

    # ------------------------------------------------------------------ what the runners call
    def identified(self, name: str, identity: ModelIdentity) -> list[Task]:
        """A model's identity is known: leave out, reuse, take stored task results; returns the
        tasks still to run (also kept as pending).
        """
        state = self.models[name]
        state.identity = identity
        stored_here = 0
        for analysis in dict.fromkeys(t.analysis for t in state.tasks):
            tasks = [t for t in state.tasks if t.analysis == analysis]
            if not runs_on(REGISTRY[analysis], identity.backend):
                state.left_out.add(analysis)
                self.say(f"  {analysis}: left out (registered as needing TransformerLens' HookedTransformer)")
                continue
            if self.save and self._reuse(name, analysis):
                continue
            study_fp = fingerprint(REGISTRY[analysis], self.config, identity)
            for task in tasks:
                found = self._stored(task, task_address(study_fp, task))
                if found is None:
                    state.pending.append(task)
                else:
                    state.parts.setdefault(analysis, {})[task] = found
                    stored_here += 1
        if stored_here:
            self.say(f"  {stored_here} stored tasks reused")
        self._finish_ready(name)
        return list(state.pending)

    def ready(self, name: str) -> list[Task]:
        """``name``'s pending tasks whose ``needs`` are finished, in the study's order."""
        state = self.models[name]
        return [t for t in state.pending if all(self._settled(name, n) for n in REGISTRY[t.analysis].needs)]

    def needs_of(self, task: Task) -> dict[str, Result]:
        """The finished results ``task``'s analysis needs (those in the study)."""
        state = self.models[task.model]
        return {n: state.finished[n] for n in REGISTRY[task.analysis].needs if n in state.finished}

    def started_task(self, task: Task) -> None:
        """``task`` was handed to a worker: no longer pending."""
        self.models[task.model].pending.remove(task)

    def requeue(self, task: Task) -> None:
        """``task``'s worker died: it is pending again, first in line."""
        self.models[task.model].pending.insert(0, task)

    def returned(self, task: Task, result: Result) -> None:
        """``task`` came back: store its result first, then finish what it completes."""
        self.store.save(task, result, tmp_dir=self.folder.tmp)
        state = self.models[task.model]
        state.parts.setdefault(task.analysis, {})[task] = result
        self._finish_ready(task.model)

    def unfinished(self) -> list[str]:
        """Labels of the tasks not yet run (pending, or waiting for a need)."""
        return [t.label for state in self.models.values() for t in state.pending]

    def study(self) -> Study:
        """The finished study, in the study's order (every analysis must be finished)."""
        study = Study(config=self.config, out_dir=self.folder.path)
        for name, state in self.models.items():
            if state.identity is None:
                continue
            missing = [a for a in self.config.analyses if a not in state.finished and a not in state.left_out]
            if missing:
                raise RuntimeError(f"{name}: {', '.join(missing)} not finished")
            study.results[name] = {a: state.finished[a] for a in self.config.analyses if a in state.finished}
            study.timings[name] = {a: state.seconds.get(a, 0.0) for a in study.results[name]}
            study.reused += [(name, a) for a in self.config.analyses if a in state.reused]
            study.left_out += [(name, a) for a in self.config.analyses if a in state.left_out]
            if study.results[name]:
                study.stages[name] = model_stages(study.results[name], name, state.identity.n_layers, study.config.bootstrap,
                                                   study.config.seed)
        return study

    # ------------------------------------------------------------------ bookkeeping
    def _reuse(self, name: str, analysis: str) -> bool:
        state = self.models[name]
        where = self.folder.result_dir(self.slugs[name], analysis)
        found = load_if_matching(where, fingerprint(REGISTRY[analysis], self.config, state.identity),
                                 self.on_mismatch, self.say)
        if found is None:
            return False
        state.finished[analysis] = found
        state.reused.add(analysis)
        self.say(f"  {analysis}: reused the finished result in {where}")
        return True

    def _stored(self, task: Task, address: str) -> Result | None:
        for store in self.stores:
            found = store.load(task, address)
            if found is not None:
                return found
        return None

    def _settled(self, name: str, analysis: str) -> bool:
        """Finished, or nothing to wait for (not in the study, or left out)."""
        state = self.models[name]
        return analysis in state.finished or analysis not in self.config.analyses or analysis in state.left_out

    def _finish_ready(self, name: str) -> None:
        """Finish every analysis of ``name`` whose tasks are all in and whose needs and reads are
        settled (until none is left to finish): saved into the folder in a study, kept in memory
        for the tasks that need it in a shard run.
        """
        state = self.models[name]
        needed = {n for t in state.tasks for n in REGISTRY[t.analysis].needs}
        progress = True
        while progress:
            progress = False
            for analysis in dict.fromkeys(t.analysis for t in state.tasks):
                entry = REGISTRY[analysis]
                tasks = [t for t in state.tasks if t.analysis == analysis]
                parts = state.parts.get(analysis, {})
                if (analysis in state.finished or len(parts) < len(tasks)
                        or not all(self._settled(name, n) for n in (*entry.needs, *entry.reads))
                        or not (self.save or analysis in needed)):
                    continue
                done = {n: state.finished[n] for n in (*entry.needs, *entry.reads) if n in state.finished}
                result = finish_analysis(analysis, list(parts.values()), self.config, done, name, state.identity)
                if self.save:
                    self.folder.save_result(result, self.slugs[name], analysis, self.config.table_format)
                    state.seconds[analysis] = float(result.provenance.get("study_seconds", 0.0))
                    self.say(f"  {analysis}: {state.seconds[analysis]:.0f} s")
                state.finished[analysis] = result
                progress = True


def run_in_process(driver: Driver, config: StudyConfig, loaded: dict[str, Any], progress: bool,
                   say: Callable[[str], None]) -> None:
    """Run the driver's tasks in this process: one model loaded at a time, in the study's order,
    its tasks in the study's order as their needs are finished.
    """
    for name, state in driver.models.items():
        if not state.tasks:
            continue
        worker = ModelWorker(config, name, loaded.get(name), work_root=driver.folder.work, progress=progress)
        tokens = worker.batches["main"]
        say(f"{name}: {worker.identity.n_layers} blocks, {tokens.shape[0]} x {tokens.shape[1]} tokens of "
            f"{config.corpus!r} (loaded in {worker.load_seconds:.0f} s)")
        driver.identified(name, worker.identity)
        while True:
            ready = driver.ready(name)
            if not ready:
                break
            task = ready[0]
            driver.started_task(task)
            driver.returned(task, worker.run(task, driver.needs_of(task)))
        if state.pending:  # cannot happen: a need that is neither finished nor pending
            raise RuntimeError(f"{name}: tasks left that cannot start: {', '.join(t.label for t in state.pending)}")
        del worker
