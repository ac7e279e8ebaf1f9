"""A study as tasks: what a distributed study schedules, stores and merges.

A task is one analysis of one model on one shard of its token batch. Only analyses registered as
``split`` run on shards (the robustness sweep: all of its plans stay in the task, so the
prefix-sharing trie and plan stacking keep working); every other analysis is one task per
model. Shards are contiguous slices of the batch the study's seed drew, so they are fixed by the
study's settings: shard ``i`` of ``n`` holds sequences ``i * S // n`` up to ``(i + 1) * S // n``.

Each finished task's tables are additive (sums and counts per sequence, never means) and are
stored atomically under a content address: the SHA-256 of the analysis' study fingerprint (model
config and weights hashes, the token batch's digest, the analysis' settings) and the shard. A
restarted study on any machine finds them and skips those tasks. The analysis' ``finish``
(:class:`~stages_of_inference.study.registry.Analysis`) puts the tasks' tables together into the
tables a one-process study makes.

The same :class:`ModelWorker` runs tasks in this process (``stages-of-inference run --shard I/N``)
and inside a Ray actor (:mod:`stages_of_inference.study.distributed`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from stages_of_inference.results import PROVENANCE_FILE, DamagedResultError, Result
from stages_of_inference.study.config import StudyConfig
from stages_of_inference.study.registry import REGISTRY, Context, Tables

__all__ = ["TASKS_DIR", "ModelWorker", "Task", "TaskStore", "assign_shards", "decode_tables", "encode_tables",
           "partial_tables", "shard_rows", "study_tasks", "task_address"]

TASKS_DIR = "tasks"
"""The folder of a study's finished task results."""


@dataclass(frozen=True, order=True)
class Task:
    """One analysis of one model on one shard of its token batch (shard 0 of 1: the whole batch).

    Example:
        >>> Task("smollm2-135m", "robustness", 1, 4).label
        'smollm2-135m robustness [shard 2 of 4]'
    """

    model: str
    analysis: str
    shard: int = 0
    n_shards: int = 1

    @property
    def label(self) -> str:
        """How logs and errors name the task."""
        where = f" [shard {self.shard + 1} of {self.n_shards}]" if self.n_shards > 1 else ""
        return f"{self.model} {self.analysis}{where}"

    def to_dict(self) -> dict[str, Any]:
        """The task as JSON-ready data."""
        return asdict(self)


def shard_rows(n_rows: int, shard: int, n_shards: int) -> slice:
    """The rows of shard ``shard`` (0-based) of ``n_shards`` of a batch of ``n_rows`` sequences.

    Example:
        >>> [shard_rows(5, i, 2) for i in range(2)]
        [slice(0, 2, None), slice(2, 5, None)]
    """
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard must lie in 0 .. {n_shards - 1}, got {shard}")
    return slice(shard * n_rows // n_shards, (shard + 1) * n_rows // n_shards)


def _batch_rows(config: StudyConfig, tokens: str) -> int:
    return config.heavy_sequences if tokens == "heavy" else config.n_sequences


def study_tasks(config: StudyConfig, n_shards: int, analyses: Sequence[str] | None = None) -> list[Task]:
    """Every task of a study split ``n_shards`` ways: a split analysis gets one task per shard
    (at most one per sequence of its batch), any other one task per model.

    Example:
        >>> [t.label for t in study_tasks(StudyConfig(analyses=("robustness", "neurons")), 2)]
        ['smollm2-135m robustness [shard 1 of 2]', 'smollm2-135m robustness [shard 2 of 2]', 'smollm2-135m neurons']
    """
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise ValueError(f"the number of shards must be a positive whole number, got {n_shards!r}")
    out = []
    for model in config.models:
        for name in (config.analyses if analyses is None else analyses):
            analysis = REGISTRY[name]
            n = min(n_shards, _batch_rows(config, analysis.tokens)) if analysis.split else 1
            out += [Task(model, name, i, n) for i in range(n)]
    return out


def assign_shards(tasks: Sequence[Task], n_shards: int) -> dict[Task, int]:
    """Which of ``n_shards`` processes runs each task: a split analysis' shard ``i`` in process
    ``i``; the other tasks of a model in groups (an analysis with the ones it ``needs``), the
    groups dealt round-robin, so a shard holds what its tasks read.

    Example:
        >>> tasks = study_tasks(StudyConfig(analyses=("robustness", "logit_lens", "neurons", "sharpening")), 2)
        >>> {t.analysis + str(t.shard): s for t, s in assign_shards(tasks, 2).items()}
        {'robustness0': 0, 'robustness1': 1, 'logit_lens0': 0, 'neurons0': 0, 'sharpening0': 0}
    """
    out: dict[Task, int] = {}
    turn = 0
    for model in dict.fromkeys(t.model for t in tasks):
        whole = [t for t in tasks if t.model == model and t.n_shards == 1 and not REGISTRY[t.analysis].split]
        group_of = {t.analysis: t.analysis for t in whole}

        def root(name: str) -> str:
            while group_of[name] != name:
                name = group_of[name]
            return name
        for t in whole:
            for need in REGISTRY[t.analysis].needs:
                if need in group_of:
                    group_of[root(t.analysis)] = root(need)
        placed: dict[str, int] = {}
        for t in tasks:
            if t.model != model:
                continue
            if t not in whole:
                out[t] = t.shard % n_shards
                continue
            group = root(t.analysis)
            if group not in placed:
                placed[group], turn = turn % n_shards, turn + 1
            out[t] = placed[group]
    return out


def task_address(study_fingerprint: dict[str, Any], task: Task) -> str:
    """The content address of a task's result: the SHA-256 of its analysis' study fingerprint
    (model, token digest, settings) and its shard.

    Example:
        >>> len(task_address({"analysis": "neurons"}, Task("m", "neurons")))
        64
    """
    text = json.dumps({"fingerprint": study_fingerprint, "shard": task.shard, "n_shards": task.n_shards},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def encode_tables(tables: Tables) -> dict[str, bytes]:
    """Tables as bytes: ``{name: Parquet, name + ".json": its provenance as JSON}`` (how tables
    cross between a Ray driver and its workers: data, never pickled objects).

    Example:
        >>> t = pd.DataFrame({"a": [1, 2]}); t.attrs["provenance"] = {"seed": 0}
        >>> back = decode_tables(encode_tables({"t": t}))
        >>> back["t"]["a"].tolist(), back["t"].attrs["provenance"]
        ([1, 2], {'seed': 0})
    """
    out: dict[str, bytes] = {}
    for name, df in tables.items():
        buffer = io.BytesIO()
        df.to_parquet(buffer, index=False)
        out[name] = buffer.getvalue()
        out[name + ".json"] = json.dumps(df.attrs.get("provenance", {}), default=str).encode()
    return out


def decode_tables(data: dict[str, bytes]) -> Tables:
    """Tables from :func:`encode_tables`."""
    tables = {}
    for name, blob in data.items():
        if name.endswith(".json"):
            continue
        df = pd.read_parquet(io.BytesIO(blob))
        df.attrs["provenance"] = json.loads(data.get(name + ".json", b"{}"))
        tables[name] = df
    return tables


class TaskStore:
    """The finished task results of a study folder: ``<folder>/tasks/<model>/<analysis>/<shard>of<n>-<address>``.

    Each result is a :class:`~stages_of_inference.results.Result` folder, written atomically, its
    files' digests checked on reading (a damaged one counts as not done); its provenance holds
    the task (``task``: model, analysis, shard, address, where and how long it ran), the study
    fingerprint of its analysis and the batch it read.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder) / TASKS_DIR

    def path(self, task: Task, address: str) -> Path:
        """Where ``task``'s result lives."""
        from stages_of_inference.study.run import slug

        return self.folder / slug(task.model) / task.analysis / f"{task.shard:04d}of{task.n_shards:04d}-{address[:24]}"

    def load(self, task: Task, address: str) -> Result | None:
        """``task``'s stored result when it is there, intact and made for ``address``; else ``None``."""
        where = self.path(task, address)
        if not (where / PROVENANCE_FILE).exists():
            return None
        try:
            result = Result.load(where)
        except DamagedResultError:
            return None
        return result if result.provenance.get("task", {}).get("address") == address else None

    def save(self, result: Result) -> Path:
        """Store a task's result (its provenance's ``task`` names it) atomically."""
        info = result.provenance["task"]
        task = Task(info["model"], info["analysis"], info["shard"], info["n_shards"])
        where = self.path(task, info["address"])
        where.parent.mkdir(parents=True, exist_ok=True)
        return result.save(where)

    def results(self) -> Iterator[Result]:
        """Every intact task result in the folder."""
        for meta in sorted(self.folder.glob(f"*/*/*/{PROVENANCE_FILE}")):
            try:
                yield Result.load(meta.parent)
            except DamagedResultError:
                continue


def partial_tables(result: Result) -> Tables:
    """A stored task result's tables, each carrying the analysis' own provenance (without the
    task's record), as ``compute`` returned them.
    """
    record = {k: v for k, v in result.provenance.items() if k not in ("task", "study_fingerprint", "batch")}
    tables = {name: df.copy() for name, df in result.tables.items()}
    for df in tables.values():
        df.attrs["provenance"] = record
    return tables


class ModelWorker:
    """One model of a study, loaded once, with its token batches: runs the study's tasks of it.

    Args:
        config: the study's settings.
        name: the model (one of ``config.models``).
        model: the model already loaded (else loaded by name with ``config.device`` and
            ``config.backend``).
        work_root: where a task keeps its checkpoints while it runs (a sweep's finished batches:
            a task retried after its worker died resumes from them); ``None``: a folder in the
            system's temporary space.
        progress: progress bars.
    """

    def __init__(self, config: StudyConfig, name: str, model: Any = None, work_root: str | Path | None = None,
                 progress: bool = False) -> None:
        import stages_of_inference as soi
        from stages_of_inference.backends import backend_of
        from stages_of_inference.study.run import batch_identity, model_identity, study_batches

        t0 = time.perf_counter()
        self.config, self.name, self.progress = config, name, progress
        self.model = model if model is not None else soi.load_model(name, device=config.device, backend=config.backend)
        self.batches = study_batches(self.model, config)
        self.model_id = model_identity(name, self.model)
        self.batch_ids = {kind: batch_identity(b) for kind, b in self.batches.items()}
        self.backend = backend_of(self.model)
        self.load_seconds = time.perf_counter() - t0
        if work_root is None:
            import tempfile

            work_root = Path(tempfile.gettempdir()) / "stages-of-inference-tasks"
        self.work_root = Path(work_root)

    def identity(self) -> dict[str, Any]:
        """What a driver that loads no model needs to address this model's tasks: the model's
        identity, its batches' identities and descriptions, its backend and blocks.
        """
        return {"model_id": self.model_id, "batches": self.batch_ids,
                "batch_records": {k: b.describe() for k, b in self.batches.items()},
                "backend": self.backend, "n_layers": int(self.model.cfg.n_layers), "pid": os.getpid(),
                "host": socket.gethostname(), "load_seconds": round(self.load_seconds, 2)}

    def fingerprint(self, analysis: str) -> dict[str, Any]:
        """The study fingerprint of one of this model's analyses."""
        from stages_of_inference.study.run import fingerprint

        return fingerprint(REGISTRY[analysis], self.config, self.model_id, self.batch_ids)

    def run(self, task: Task, done: dict[str, Result]) -> Result:
        """Run one task: the analysis' ``compute`` on the task's shard of its batch, ``done``
        holding the finished results it ``needs``. Returns its tables with the task's record.
        """
        if task.model != self.name:
            raise ValueError(f"this worker holds {self.name!r}, not the model of task {task.label!r}")
        analysis = REGISTRY[task.analysis]
        study_fp = self.fingerprint(task.analysis)
        address = task_address(study_fp, task)
        main, heavy, first = self.batches["main"], self.batches["heavy"], 0
        if analysis.split:
            rows = shard_rows(len(self.batches[analysis.tokens]), task.shard, task.n_shards)
            first = rows.start
            main, heavy = (main[rows], heavy) if analysis.tokens == "main" else (main, heavy[rows])
        work = self.work_root / address[:32]
        t0 = time.perf_counter()
        ctx = Context(self.model, main, heavy, self.config, self.progress, work, done, first_sequence=first)
        tables = analysis.compute(ctx)
        record = dict(next(iter(tables.values())).attrs.get("provenance", {}))
        record["task"] = {**task.to_dict(), "address": address, "seconds": round(time.perf_counter() - t0, 3),
                          "host": socket.gethostname(), "pid": os.getpid()}
        record["study_fingerprint"] = study_fp
        if analysis.tokens != "none":
            record["batch"] = self.batches[analysis.tokens].describe()
        result = Result({k: v.copy() for k, v in tables.items()}, record)
        shutil.rmtree(work, ignore_errors=True)
        return result
