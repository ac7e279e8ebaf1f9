"""A study as tasks, and the one function that runs a task.

A task is one analysis of one model on one shard of its token batch. Only analyses registered as
``split`` run on shards (the robustness sweep: all of its plans stay in the task, so the
prefix-sharing trie and plan stacking keep working); every other analysis is one task per model.
A shard is a contiguous run of whole batches (``config.batch_size`` sequences each) of the batch
the study's seed drew, so every batch is computed exactly as one process computes it, and the
shards' sums pool to the one-process numbers bit for bit; there are at most as many shards as
batches.

:meth:`ModelWorker.run` is the task function every runner calls (one process, ``--shard``, a Ray
actor). Each finished task's tables are additive (sums and counts per sequence, never means)
and are stored atomically under a content address, the SHA-256 of the analysis' study
fingerprint and the shard (:class:`TaskStore`): a restarted study on any machine finds them and
skips those tasks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from stages_of_inference.models import load_model
from stages_of_inference.results import PROVENANCE_FILE, DamagedResultError, Result
from stages_of_inference.study.config import StudyConfig
from stages_of_inference.study.identity import ModelIdentity, fingerprint, identity_of, study_batches, study_record
from stages_of_inference.study.registry import REGISTRY, Context, Tables

__all__ = ["ModelWorker", "Task", "TaskStore", "assign_shards", "decode_result", "decode_tables", "encode_result",
           "encode_tables", "shard_rows", "split_count", "study_tasks", "task_address"]


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

    @classmethod
    def from_dict(cls, data: Any) -> Task:
        """A task from :meth:`to_dict` (a ``ValueError`` naming what is wrong otherwise)."""
        if (not isinstance(data, dict) or not isinstance(data.get("model"), str) or not isinstance(data.get("analysis"), str)
                or any(isinstance(data.get(k), bool) or not isinstance(data.get(k), int) for k in ("shard", "n_shards"))
                or not 0 <= data["shard"] < data["n_shards"]):
            raise ValueError(f"a task is {{model, analysis, shard, n_shards}} with 0 <= shard < n_shards, got {data!r}")
        return cls(data["model"], data["analysis"], data["shard"], data["n_shards"])


def _batches(n_rows: int, batch_size: int) -> int:
    return -(-n_rows // batch_size)


def shard_rows(n_rows: int, shard: int, n_shards: int, batch_size: int = 1) -> slice:
    """The rows of shard ``shard`` (0-based) of ``n_shards`` of a batch of ``n_rows`` sequences:
    a contiguous run of whole batches of ``batch_size`` sequences.

    Example:
        >>> [shard_rows(5, i, 2) for i in range(2)]
        [slice(0, 2, None), slice(2, 5, None)]
        >>> [shard_rows(6, i, 2, batch_size=4) for i in range(2)]
        [slice(0, 4, None), slice(4, 6, None)]
    """
    batches = _batches(n_rows, batch_size)
    if not 0 <= shard < n_shards <= batches:
        raise ValueError(f"shard must lie in 0 .. {n_shards - 1}, and there are at most {batches} shards of "
                         f"{n_rows} sequences in batches of {batch_size}; got shard {shard} of {n_shards}")
    first, last = shard * batches // n_shards, (shard + 1) * batches // n_shards
    return slice(first * batch_size, min(last * batch_size, n_rows))


def _batch_rows(config: StudyConfig, tokens: str) -> int:
    return config.heavy_sequences if tokens == "heavy" else config.n_sequences


def split_count(config: StudyConfig, analysis: str, n_shards: int) -> int:
    """How many shards ``analysis`` runs on when a study is split ``n_shards`` ways: as many as
    asked for a split analysis, at most one per batch of its token batch; 1 otherwise.

    Example:
        >>> c = StudyConfig(n_tokens=1024, batch_size=2)  # 8 sequences: 4 batches
        >>> split_count(c, "robustness", 8), split_count(c, "neurons", 8)
        (4, 1)
    """
    entry = REGISTRY[analysis]
    if not entry.split:
        return 1
    return min(n_shards, _batches(_batch_rows(config, entry.tokens), config.batch_size))


def study_tasks(config: StudyConfig, n_shards: int) -> list[Task]:
    """Every task of a study split ``n_shards`` ways (:func:`split_count`), in the study's order.

    Example:
        >>> c = StudyConfig(analyses=("robustness", "neurons"), batch_size=4)
        >>> [t.label for t in study_tasks(c, 2)]
        ['smollm2-135m robustness [shard 1 of 2]', 'smollm2-135m robustness [shard 2 of 2]', 'smollm2-135m neurons']
    """
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise ValueError(f"the number of shards must be a positive whole number, got {n_shards!r}")
    out = []
    for model in config.models:
        for name in config.analyses:
            n = split_count(config, name, n_shards)
            out += [Task(model, name, i, n) for i in range(n)]
    return out


def assign_shards(tasks: Sequence[Task], n_shards: int) -> dict[Task, int]:
    """Which of ``n_shards`` processes runs each task: a split analysis' shard ``i`` in process
    ``i``; the other tasks of a model in groups (an analysis with the ones it ``needs``), the
    groups dealt round-robin, so a process holds what its tasks read.

    Example:
        >>> tasks = study_tasks(StudyConfig(analyses=("robustness", "logit_lens", "neurons", "sharpening"), batch_size=4), 2)
        >>> {t.analysis + str(t.shard): s for t, s in assign_shards(tasks, 2).items()}
        {'robustness0': 0, 'robustness1': 1, 'logit_lens0': 0, 'neurons0': 0, 'sharpening0': 0}
    """
    out: dict[Task, int] = {}
    turn = 0
    for model in dict.fromkeys(t.model for t in tasks):
        whole = [t for t in tasks if t.model == model and not REGISTRY[t.analysis].split]
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


# --------------------------------------------------------------------------- tables as data
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


_PROVENANCE_KEY = "__provenance__"


def encode_result(result: Result) -> dict[str, bytes]:
    """A result as bytes: its tables as Parquet, its provenance as JSON.

    Example:
        >>> r = Result({"t": pd.DataFrame({"a": [1]})}, {"seed": 0})
        >>> decode_result(encode_result(r)).provenance
        {'seed': 0}
    """
    return {**encode_tables(result.tables), _PROVENANCE_KEY: json.dumps(result.provenance, default=str).encode()}


def decode_result(blob: dict[str, bytes]) -> Result:
    """A result from :func:`encode_result`."""
    return Result(decode_tables({k: v for k, v in blob.items() if k != _PROVENANCE_KEY}), json.loads(blob[_PROVENANCE_KEY]))


# --------------------------------------------------------------------------- stored task results
class TaskStore:
    """Finished task results in ``folder``: ``<model>/<analysis>/<shard>of<n>-<address>``.

    Each result is a :class:`~stages_of_inference.results.Result` folder, written atomically, its
    files' digests checked on reading (a damaged one counts as not done); its provenance holds
    the task (``task``: model, analysis, shard, address, where and how long it ran), the study
    fingerprint of its analysis and the batch it read.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def path(self, task: Task, address: str) -> Path:
        """Where ``task``'s result lives (the model's name made a folder name: readable; the
        address tells models apart).
        """
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in task.model).strip("._")[-80:] or "model"
        return self.folder / name / task.analysis / f"{task.shard:04d}of{task.n_shards:04d}-{address[:24]}"

    def load(self, task: Task, address: str) -> Result | None:
        """``task``'s stored result when it is there, intact and made for ``address``; else ``None``."""
        where = self.path(task, address)
        if not (where / PROVENANCE_FILE).is_file():
            return None
        try:
            result = Result.load(where)
        except DamagedResultError:
            return None
        found = result.provenance.get("task")
        return result if isinstance(found, dict) and found.get("address") == address else None

    def save(self, task: Task, result: Result, tmp_dir: str | os.PathLike[str] | None = None) -> Path:
        """Store ``task``'s result (its provenance's ``task`` holds its address) atomically."""
        where = self.path(task, result.provenance["task"]["address"])
        where.parent.mkdir(parents=True, exist_ok=True)
        return result.save(where, tmp_dir=tmp_dir)

    def results(self) -> Iterator[Result]:
        """Every intact task result in the folder."""
        for meta in sorted(self.folder.glob(f"*/*/*/{PROVENANCE_FILE}")):
            try:
                yield Result.load(meta.parent)
            except DamagedResultError:
                continue


def task_tables(result: Result) -> Tables:
    """A stored task result's tables, each carrying the analysis' own provenance (without the
    study's record), as ``compute`` returned them.
    """
    record = {k: v for k, v in result.provenance.items() if k not in ("task", "study_fingerprint")}
    tables = {name: df.copy() for name, df in result.tables.items()}
    for df in tables.values():
        df.attrs["provenance"] = record
    return tables


# --------------------------------------------------------------------------- the task function
class ModelWorker:
    """One model of a study, loaded once, with its token batches: runs the study's tasks of it.

    Args:
        config: the study's settings.
        name: the model (one of ``config.models``).
        model: the model already loaded (else loaded by name with ``config.device`` and
            ``config.backend``).
        work_root: the folder where a task keeps its checkpoints while it runs (a study folder's
            private ``work`` folder: a task run again after an interruption resumes from them);
            ``None``, or a folder this machine does not have: a temporary folder per task,
            removed with it.
        progress: progress bars.
    """

    def __init__(self, config: StudyConfig, name: str, model: Any = None, work_root: str | os.PathLike[str] | None = None,
                 progress: bool = False) -> None:
        t0 = time.perf_counter()
        self.config, self.name, self.progress = config, name, progress
        self.model = model if model is not None else load_model(name, device=config.device, backend=config.backend)
        self.batches = study_batches(self.model, config)
        self.identity: ModelIdentity = identity_of(name, self.model, self.batches)
        self.load_seconds = time.perf_counter() - t0
        self.work_root = Path(work_root) if work_root is not None else None

    def where(self) -> dict[str, Any]:
        """Where the model was loaded: host, process and how long the load took."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "load_seconds": round(self.load_seconds, 2)}

    def run(self, task: Task, needs: dict[str, Result]) -> Result:
        """Run one task: the analysis' ``compute`` on the task's shard of its batch, ``needs``
        holding the finished results it ``needs``. Returns its tables with the study's record
        (:func:`~stages_of_inference.study.identity.study_record`) and the task's.
        """
        if task.model != self.name:
            raise ValueError(f"this worker holds {self.name!r}, not the model of task {task.label!r}")
        analysis = REGISTRY[task.analysis]
        study_fp = fingerprint(analysis, self.config, self.identity)
        address = task_address(study_fp, task)
        main, heavy, first = self.batches["main"], self.batches["heavy"], 0
        if analysis.split:
            rows = shard_rows(len(self.batches[analysis.tokens]), task.shard, task.n_shards, self.config.batch_size)
            first = rows.start
            main, heavy = (main[rows], heavy) if analysis.tokens == "main" else (main, heavy[rows])
        own = self.work_root is not None and self.work_root.parent.is_dir()
        work = self.work_root / address[:32] if own else Path(tempfile.mkdtemp(prefix="stages-of-inference-task-"))
        t0 = time.perf_counter()
        try:
            tables = analysis.compute(Context(self.model, main, heavy, self.config, self.progress, work, needs,
                                              first_sequence=first))
        finally:
            if not own:
                shutil.rmtree(work, ignore_errors=True)
        record = study_record(tables, self.name, study_fp, self.identity, analysis,
                              task={**task.to_dict(), "address": address, "seconds": round(time.perf_counter() - t0, 3),
                                    **self.where()})
        result = Result({k: v.copy() for k, v in tables.items()}, record)
        shutil.rmtree(work, ignore_errors=True)
        return result
