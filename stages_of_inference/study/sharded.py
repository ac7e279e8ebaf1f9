"""A study split over processes that share nothing but files: ``--shard I/N`` and ``merge``.

``stages-of-inference run --shard I/N --out-dir DIR_I`` runs the tasks of shard ``I`` of ``N``
(:func:`run_shard`) and writes their results under ``DIR_I/tasks`` with ``DIR_I/shard-I-of-N.json``;
``stages-of-inference merge DIR_0 DIR_1 ... --out-dir OUT`` (:func:`merge_studies`) checks that
every task of the study is there, from shards of one study, finishes every analysis (pooling
the shards' sums) and writes the study and its report into ``OUT``, as a one-process run would.
That serves a SLURM job array (one array task per shard, then one merge job) and any scheduler,
with no dependency beyond this package (docs/distributed/slurm.md).

:func:`finish_study` is the step ``merge`` and the Ray driver share: tasks' results to finished
analyses, stage placements and the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stages_of_inference._checks import check_output_path
from stages_of_inference._utils import atomic_write_json
from stages_of_inference.results import Result
from stages_of_inference.study.config import StudyConfig
from stages_of_inference.study.registry import REGISTRY
from stages_of_inference.study.tasks import (
    ModelWorker,
    Task,
    TaskStore,
    assign_shards,
    partial_tables,
    study_tasks,
    task_address,
)

__all__ = ["MergeError", "finish_study", "merge_studies", "parse_shard", "run_shard", "shard_file"]


class MergeError(ValueError):
    """Task results that cannot be merged into one study (missing, or from different studies)."""


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
              log: Callable[[str], None] | None = print) -> list[Task]:
    """Run the tasks of shard ``shard`` (0-based) of ``n_shards`` and store their results in
    ``out_dir`` (a task already stored there is not run again). Returns the shard's tasks.
    """
    from stages_of_inference.study.run import _study_folder

    say = log or (lambda _: None)
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard must lie in 0 .. {n_shards - 1}, got {shard}")
    out = check_output_path(out_dir, "out_dir folder")
    tasks = study_tasks(config, n_shards)
    mine = [t for t, s in assign_shards(tasks, n_shards).items() if s == shard]
    store, listed, left_out = TaskStore(out), [], []
    needed = {n for a in config.analyses for n in REGISTRY[a].needs}  # finished here for the tasks that read them
    with _study_folder(out, say):
        for name in config.models:
            todo = [t for t in mine if t.model == name]
            if not todo:
                continue
            worker = ModelWorker(config, name, (loaded or {}).get(name), work_root=out / ".work", progress=progress)
            say(f"{name}: shard {shard + 1} of {n_shards}, {len(todo)} tasks (model loaded in {worker.load_seconds:.0f} s)")
            done: dict[str, Result] = {}
            for task in todo:
                if worker.backend == "bridge" and not REGISTRY[task.analysis].bridge:
                    left_out.append(task.to_dict())
                    say(f"  {task.label}: left out (registered as needing TransformerLens' HookedTransformer)")
                    continue
                result = _run_or_reuse(worker, task, store, done, say)
                listed.append({**task.to_dict(), "address": result.provenance["task"]["address"]})
                if task.analysis in needed:  # never split: the whole result is here
                    done[task.analysis] = _finished(task.analysis, [result], config, done)
        atomic_write_json(out / shard_file(shard, n_shards), {"study": config.to_dict(), "shard": shard + 1,
                                                              "n_shards": n_shards, "tasks": listed,
                                                              "left_out": left_out})
    say(f"shard {shard + 1} of {n_shards}: {len(listed)} task results in {store.folder}; when every shard is done: "
        f"stages-of-inference merge <their folders> --out-dir <study folder>")
    return mine


def _run_or_reuse(worker: ModelWorker, task: Task, store: TaskStore, done: dict[str, Result],
                  say: Callable[[str], None]) -> Result:
    address = task_address(worker.fingerprint(task.analysis), task)
    found = store.load(task, address)
    if found is not None:
        say(f"  {task.label}: reused the stored result")
        return found
    needs = {n: done[n] for n in REGISTRY[task.analysis].needs if n in done}
    result = worker.run(task, needs)
    store.save(result)
    say(f"  {task.label}: {result.provenance['task']['seconds']:.0f} s")
    return result


def _finished(analysis: str, parts: Sequence[Result], config: StudyConfig, done: dict[str, Result]) -> Result:
    """An analysis finished from its tasks' stored results (in shard order)."""
    from stages_of_inference.study.run import finished_result

    ordered = sorted(parts, key=lambda r: r.provenance["task"]["shard"])
    first = ordered[0].provenance
    return finished_result(REGISTRY[analysis], [partial_tables(r) for r in ordered], config, done,
                           first["study_fingerprint"], first.get("batch"),
                           sum(r.provenance["task"]["seconds"] for r in ordered))


def finish_study(config: StudyConfig, out_dir: Path, results: dict[Task, Result], left_out: Sequence[tuple[str, str]],
                 *, reused: dict[tuple[str, str], Result] | None = None, write_report: bool = True,
                 say: Callable[[str], None] = print) -> Any:
    """Finish every analysis of every model from its tasks' ``results``, in the study's order,
    save them in ``out_dir`` (as a one-process study does), place the stages, write
    ``study.json`` and the report. ``reused``: analyses already finished in ``out_dir``, taken as
    they are. Returns the :class:`~stages_of_inference.study.run.Study`.
    """
    from stages_of_inference.study.html import build_report
    from stages_of_inference.study.run import STUDY_FILE, Study, _stages_for, study_slugs

    study = Study(config=config, out_dir=out_dir, left_out=list(left_out))
    by_analysis: dict[tuple[str, str], list[Result]] = {}
    for task, result in results.items():
        by_analysis.setdefault((task.model, task.analysis), []).append(result)
    slugs = study_slugs(config)
    for name in config.models:
        done: dict[str, Result] = {}
        study.timings[name] = {}
        for analysis in config.analyses:
            if (name, analysis) in study.left_out:
                continue
            if (name, analysis) in (reused or {}):
                done[analysis] = (reused or {})[(name, analysis)]
                study.reused.append((name, analysis))
                study.timings[name][analysis] = 0.0
                continue
            parts = by_analysis.get((name, analysis))
            if not parts:
                raise MergeError(f"no task results of {name} {analysis}")
            _check_same_study(name, analysis, parts)
            result = _finished(analysis, parts, config, done)
            result.save(out_dir / slugs[name] / analysis, fmt=config.table_format)
            done[analysis] = result
            study.timings[name][analysis] = float(result.provenance.get("study_seconds", 0.0))
        study.results[name] = done
        n_layers = next((int(r.provenance["model"]["n_layers"]) for r in done.values()
                         if r.provenance.get("model", {}).get("n_layers")), 0)
        if done and n_layers:
            study.stages[name] = _stages_for(done, name, n_layers)
        say(f"{name}: {len(done)} analyses finished from {sum(len(by_analysis.get((name, a), [])) for a in done)} "
            "task results")
    atomic_write_json(out_dir / STUDY_FILE, config.to_dict())
    if write_report:
        build_report(study)
        say(f"report: {study.report}")
    return study


def _check_same_study(name: str, analysis: str, parts: Sequence[Result]) -> None:
    """Every shard of an analysis was made by the same model, batch and settings, and the shards
    are all there exactly once.
    """
    prints = {json.dumps(r.provenance["study_fingerprint"], sort_keys=True, default=str) for r in parts}
    if len(prints) > 1:
        raise MergeError(f"the task results of {name} {analysis} come from different studies (model weights, "
                         "tokens or settings differ); merge the shards of one study")
    shards = sorted(r.provenance["task"]["shard"] for r in parts)
    n = parts[0].provenance["task"]["n_shards"]
    if shards != list(range(n)):
        raise MergeError(f"{name} {analysis}: shards {[s + 1 for s in shards]} of {n} found; each must be there once")


def merge_studies(folders: Sequence[str | Path], out_dir: str | Path, *, write_report: bool = True,
                  log: Callable[[str], None] | None = print) -> Any:
    """Merge the task results of ``--shard`` runs (one or more folders, each holding
    ``shard-I-of-N.json`` records and a ``tasks`` folder) into one study in ``out_dir``.

    Every shard of the study must be there, all made with the same settings; a missing shard or
    task is named in the error. Returns the :class:`~stages_of_inference.study.run.Study`.
    """
    from stages_of_inference.study.run import _study_folder

    say = log or (lambda _: None)
    t0 = time.perf_counter()
    records = _shard_records(folders)
    configs = {json.dumps(r["study"], sort_keys=True) for r, _ in records}
    if len(configs) > 1:
        raise MergeError("the shards were run with different study settings; merge the shards of one study")
    config = StudyConfig.from_json(next(iter(configs)))
    counts = {r["n_shards"] for r, _ in records}
    if len(counts) > 1:
        raise MergeError(f"the shards split the study different ways ({sorted(counts)} shards); merge one split")
    n_shards = counts.pop()
    missing = sorted(set(range(1, n_shards + 1)) - {r["shard"] for r, _ in records})
    if missing:
        raise MergeError(f"shard(s) {', '.join(map(str, missing))} of {n_shards} are missing: run them "
                         f"(stages-of-inference run --shard I/{n_shards}) or add their folders")
    results: dict[Task, Result] = {}
    left_out = {(t["model"], t["analysis"]) for r, _ in records for t in r.get("left_out", [])}
    for record, folder in records:
        store = TaskStore(folder)
        for entry in record["tasks"]:
            task = Task(entry["model"], entry["analysis"], entry["shard"], entry["n_shards"])
            found = store.load(task, entry["address"])
            if found is None:
                raise MergeError(f"{task.label}: its result is not in {store.folder} (or damaged); run its shard again")
            results[task] = found
    expected = [t for t in study_tasks(config, n_shards) if (t.model, t.analysis) not in left_out]
    absent = [t.label for t in expected if t not in results]
    if absent:
        raise MergeError(f"{len(absent)} task(s) have no result, e.g. {absent[0]}; run their shards again")
    out = check_output_path(out_dir, "out_dir folder")
    with _study_folder(out, say):
        study = finish_study(config, out, results, sorted(left_out), write_report=write_report, say=say)
    say(f"merged {len(results)} task results from {len(records)} shard(s) in {time.perf_counter() - t0:.0f} s")
    return study


def _shard_records(folders: Sequence[str | Path]) -> list[tuple[dict[str, Any], Path]]:
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
        for path in found:
            try:
                out.append((json.loads(path.read_text()), folder))
            except (OSError, ValueError) as error:
                raise MergeError(f"{path} cannot be read ({type(error).__name__})") from None
    return out
