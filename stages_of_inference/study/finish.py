"""Finishing a study: an analysis' task results put together into its finished result, and the
study written (``study.json`` and the report). One process, ``merge`` and a Ray driver all
finish through these two functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from stages_of_inference.results import Result
from stages_of_inference.study.config import StudyConfig
from stages_of_inference.study.folder import STUDY_FILE, StudyFolder
from stages_of_inference.study.html import build_report
from stages_of_inference.study.identity import ModelIdentity, fingerprint, study_record
from stages_of_inference.study.registry import REGISTRY, Finishing, Study
from stages_of_inference.study.tasks import task_tables

__all__ = ["finish_analysis", "write_study"]


def finish_analysis(analysis: str, parts: Sequence[Result], config: StudyConfig, done: dict[str, Result], name: str,
                    identity: ModelIdentity) -> Result:
    """The finished result of one analysis of model ``name`` from its tasks' results (any order):
    the analysis' ``finish`` of their tables, in shard order, with ``done`` holding the finished
    analyses it needs and reads; its provenance is the study's record with the study's settings
    and the seconds its tasks took.
    """
    entry = REGISTRY[analysis]
    ordered = sorted(parts, key=lambda r: int(r.provenance["task"]["shard"]))
    tables = entry.finish([task_tables(r) for r in ordered], Finishing(config, done))
    seconds = sum(float(r.provenance["task"].get("seconds", 0.0)) for r in ordered)
    record = study_record(tables, name, fingerprint(entry, config, identity), identity, entry,
                          study=config.to_dict(), study_seconds=round(seconds, 1))
    return Result({k: v.copy() for k, v in tables.items()}, record)


def write_study(study: Study, folder: StudyFolder, write_report: bool, say: Callable[[str], None]) -> None:
    """Write a finished study's ``study.json`` (last: a run stopped before leaves the folder's
    record as it was) and, if asked, its report.
    """
    folder.write_json(STUDY_FILE, study.config.to_dict())
    if write_report:
        build_report(study, tmp_dir=folder.tmp)
        say(f"report: {study.report}")
