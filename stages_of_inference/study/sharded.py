"""A study split over processes that share nothing but files: ``--shard I/N`` and ``merge``.

``stages-of-inference run --shard I/N --out-dir DIR_I`` runs the tasks of shard ``I`` of ``N``
(:func:`run_shard`): the engine's driver with the shard's slice of the plan, in this process. It
stores the task results in ``DIR_I``'s private folder and writes ``DIR_I/shard-I-of-N.json``: the
study's settings, the identity of every model it loaded (weights and config hashes, token
digests, backend) and its tasks. ``stages-of-inference merge DIR_1 ... DIR_N --out-dir OUT``
(:func:`merge_studies`) checks that the records belong to one study (same settings, same split,
every shard there once, every model made from the same weights and tokens in every shard: a
mismatch names the shard, the model and the two values) and runs the same driver with nothing
left to compute: it finishes every analysis from the stored task results and writes the study
and its report into ``OUT``, as a one-process run writes them. That serves a SLURM job array and
any scheduler, with no dependency beyond this package (docs/distributed/slurm.md).
"""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stages_of_inference._checks import check_output_path
from stages_of_inference.study.config import StudyConfig, check_inputs
from stages_of_inference.study.engine import Driver, run_in_process
from stages_of_inference.study.finish import write_study
from stages_of_inference.study.folder import StudyFolder, study_writes
from stages_of_inference.study.identity import ModelIdentity
from stages_of_inference.study.registry import Study
from stages_of_inference.study.tasks import Task, TaskStore, assign_shards, study_tasks

__all__ = ["MergeError", "ShardRecord", "merge_studies", "parse_shard", "read_shard_record", "run_shard", "shard_file"]

MAX_RECORD_BYTES = 16 << 20
"""A shard record larger than this is refused (records are small: settings and task lists)."""


class MergeError(ValueError):
    """Shard results that cannot be merged into one study (missing, damaged, or from different studies)."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"``, shard ``I`` counted from 1 (as ``sbatch --array=1-N`` numbers its tasks), to
    ``(i, n)`` with ``i`` counted from 0; ``"0/N"`` is refused, so that one convention holds.

    Example:
        >>> parse_shard("2/4")
        (1, 4)
    """
    try:
        first, second = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"a shard is written I/N with whole numbers, 1 <= I <= N (e.g. 1/4), got {text!r}") from None
    if not 1 <= first <= second:
        raise ValueError(f"a shard is written I/N with 1 <= I <= N (e.g. 1/4 .. 4/4), got {text!r}")
    return first - 1, second


def shard_file(shard: int, n_shards: int) -> str:
    """The record a ``--shard`` run leaves in its folder (``shard`` counted from 0).

    Example:
        >>> shard_file(0, 4)
        'shard-1-of-4.json'
    """
    return f"shard-{shard + 1}-of-{n_shards}.json"


def run_shard(config: StudyConfig, shard: int, n_shards: int, out_dir: str | Path, *,
              loaded: dict[str, Any] | None = None, progress: bool = False,
              log: Callable[[str], None] | None = print, adopt_folder: bool = False) -> list[Task]:
    """Run the tasks of shard ``shard`` (0-based) of ``n_shards`` and store their results in
    ``out_dir`` (a task already stored there is not run again). Returns the shard's tasks.
    """
    say = log or (lambda _: None)
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or not isinstance(shard, int) or not 0 <= shard < n_shards:
        raise ValueError(f"shard must lie in 0 .. n_shards - 1, got shard {shard!r} of {n_shards!r}")
    check_inputs(config)
    tasks = study_tasks(config, n_shards)
    mine = [t for t, s in assign_shards(tasks, n_shards).items() if s == shard]
    folder = StudyFolder(check_output_path(out_dir, "out_dir folder"))
    name = shard_file(shard, n_shards)
    with folder.held(adopt=adopt_folder, writes=[name], say=say, keep_tasks=True):
        driver = Driver(config, folder, mine, say=say, save=False)
        run_in_process(driver, config, loaded or {}, progress, say)
        record = {"study": config.to_dict(), "shard": shard + 1, "n_shards": n_shards,
                  "models": {m: s.identity.to_dict() for m, s in driver.models.items() if s.identity is not None},
                  "tasks": [{**t.to_dict(), "address": r.provenance["task"]["address"]}
                            for s in driver.models.values() for a in s.parts.values() for t, r in a.items()],
                  "left_out": [Task(m, a).to_dict() for m, s in driver.models.items() for a in sorted(s.left_out)]}
        folder.write_json(name, record)
    say(f"shard {shard + 1} of {n_shards}: {len(record['tasks'])} task results in {folder.path}; when every shard is "
        "done: stages-of-inference merge <their folders> --out-dir <study folder>")
    return mine


class ShardRecord:
    """A ``shard-I-of-N.json`` read as untrusted input: every field checked, one line naming the
    file otherwise.

    Attributes:
        path: the record's file.
        config: the study's settings.
        shard: the shard, counted from 1.
        n_shards: how many shards the study was split into.
        models: model name -> the identity of the model this shard loaded.
    """

    def __init__(self, path: Path, data: Any) -> None:
        self.path = path
        try:
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            self.config = StudyConfig.from_dict(data.get("study"))
            self.shard, self.n_shards = data.get("shard"), data.get("n_shards")
            if any(isinstance(v, bool) or not isinstance(v, int) for v in (self.shard, self.n_shards)) \
                    or not 1 <= self.shard <= self.n_shards:
                raise ValueError(f"shard and n_shards must be whole numbers with 1 <= shard <= n_shards, got "
                                 f"{data.get('shard')!r} and {data.get('n_shards')!r}")
            models = data.get("models")
            if not isinstance(models, dict):
                raise ValueError("models must map each model to its identity")
            self.models = {str(m): ModelIdentity.from_dict(v) for m, v in models.items()}
        except (ValueError, TypeError) as error:
            raise MergeError(f"{path} is not a shard record this library wrote ({' '.join(str(error).split())[:300]})") from None

    @property
    def label(self) -> str:
        """How messages name the shard."""
        return f"shard {self.shard} of {self.n_shards} ({self.path.parent})"


def read_shard_record(path: Path) -> ShardRecord:
    """Read and check one shard record: a regular file (a FIFO or device is refused without
    being opened), at most :data:`MAX_RECORD_BYTES`, JSON, with every field of the right type.
    """
    try:
        info = path.lstat()
    except OSError as error:
        raise MergeError(f"{path} cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(info.st_mode):
        raise MergeError(f"{path} is not a regular file (a shard record is a JSON file a --shard run wrote)")
    if info.st_size > MAX_RECORD_BYTES:
        raise MergeError(f"{path} is {info.st_size} bytes; a shard record is at most {MAX_RECORD_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise MergeError(f"{path} cannot be read as JSON ({type(error).__name__})") from None
    return ShardRecord(path, data)


def _shard_records(folders: Sequence[str | Path]) -> list[ShardRecord]:
    if isinstance(folders, (str, Path)):
        folders = [folders]
    if not folders:
        raise MergeError("no folders given: name the folders the --shard runs wrote")
    out = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise MergeError(f"{folder} is not a folder (give the --out-dir of each --shard run)")
        found = sorted(folder.glob("shard-*-of-*.json"))
        if not found:
            raise MergeError(f"{folder} holds no shard record (shard-I-of-N.json): is it the --out-dir of a --shard run?")
        out += [read_shard_record(path) for path in found]
    return out


def _differing_setting(a: StudyConfig, b: StudyConfig) -> str:
    left, right = a.to_dict(), b.to_dict()
    key = next(k for k in sorted(left) if left[k] != right[k])
    return f"{key}: {left[key]!r} against {right[key]!r}"


def _one_study(records: list[ShardRecord]) -> tuple[StudyConfig, int, dict[str, ModelIdentity]]:
    """The study the records belong to, its split and each model's identity; a mismatch is one line."""
    first = records[0]
    for record in records[1:]:
        if record.config != first.config:
            raise MergeError(f"the shards were run with different study settings ({_differing_setting(first.config, record.config)}; "
                             f"{first.label} against {record.label}); merge the shards of one study")
        if record.n_shards != first.n_shards:
            raise MergeError(f"the shards split the study different ways ({first.n_shards} and {record.n_shards} "
                             "shards); merge one split")
    seen: dict[int, ShardRecord] = {}
    for record in records:
        if record.shard in seen:
            raise MergeError(f"shard {record.shard} of {record.n_shards} is given twice ({seen[record.shard].path} and "
                             f"{record.path}); give each shard's folder once")
        seen[record.shard] = record
    missing = sorted(set(range(1, first.n_shards + 1)) - set(seen))
    if missing:
        raise MergeError(f"shard(s) {', '.join(map(str, missing))} of {first.n_shards} are missing: run them "
                         f"(stages-of-inference run --shard I/{first.n_shards}) or add their folders")
    identities: dict[str, tuple[ModelIdentity, ShardRecord]] = {}
    for record in records:
        for name, identity in record.models.items():
            if name not in identities:
                identities[name] = (identity, record)
                continue
            known, where = identities[name]
            difference = known.differs(identity)
            if difference is not None:
                raise MergeError(f"{name}: {where.label} and {record.label} were made from different models or text "
                                 f"({difference}); merge the shards of one study")
    return first.config, first.n_shards, {name: pair[0] for name, pair in identities.items()}


def merge_studies(folders: Sequence[str | Path], out_dir: str | Path, *, write_report: bool = True,
                  log: Callable[[str], None] | None = print, adopt_folder: bool = False) -> Study:
    """Merge the task results of ``--shard`` runs (one or more folders, each holding
    ``shard-I-of-N.json`` records) into one study in ``out_dir``.

    Every shard of the study must be there once, all made with the same settings, models and
    text; a missing shard or task, or a mismatch, is one line naming it. Returns the
    :class:`~stages_of_inference.study.registry.Study`.
    """
    say = log or (lambda _: None)
    t0 = time.perf_counter()
    records = _shard_records(folders)
    config, n_shards, identities = _one_study(records)
    folder = StudyFolder(check_output_path(out_dir, "out_dir folder"))
    stores = [TaskStore(StudyFolder(r.path.parent).tasks) for r in records]
    with folder.held(adopt=adopt_folder, writes=study_writes(config), say=say):
        driver = Driver(config, folder, study_tasks(config, n_shards), say=say, stores=stores)
        for name in config.models:
            if name not in identities:
                raise MergeError(f"no shard loaded {name}: run every shard of the study")
            say(f"{name}: from the shard records")
            left = driver.identified(name, identities[name])
            if left:
                raise MergeError(f"{len(left)} task(s) have no result in the shard folders (or a damaged one), e.g. "
                                 f"{left[0].label}; run its shard again")
        study = driver.study()
        write_study(study, folder, write_report, say)
    say(f"merged {len(records)} shard(s) in {time.perf_counter() - t0:.0f} s")
    return study
