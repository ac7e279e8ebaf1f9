"""What the study knows of an analysis, and what a study made.

An :class:`Analysis` says everything the study needs to know of an analysis: the settings that
determine its numbers (part of its fingerprint, so a finished result is reused only when they
match), which token batch it reads, how it runs (a function of a :class:`Context` returning named
tables), how the tables of its tasks are put together (``finish``), its figures with their
written readings, and the analyses it reads. :func:`register` adds one to :data:`REGISTRY`; the
study's engine, the report and the command line (``--analyses``) read the registry and know
nothing else about any analysis. The built-in analyses are registered by
:mod:`stages_of_inference.study.analyses` (docs/report.md, notebooks/05_extending.ipynb).

:class:`Study` is what a run made (or :func:`~stages_of_inference.study.folder.load_study` read
back): results per model and analysis, the stage placements and the report's figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from stages_of_inference.batch import TokenBatch
from stages_of_inference.results import Result

if TYPE_CHECKING:  # annotations only: the settings are validated against this registry
    from stages_of_inference.study.config import StudyConfig

__all__ = ["REGISTRY", "Analysis", "Context", "Figure", "Finishing", "Study", "Style", "Tables", "default_analyses",
           "fast_analyses", "one_figure", "register", "runs_on", "tables_of", "whole"]

Tables = dict[str, pd.DataFrame]


@dataclass(frozen=True)
class Context:
    """What an analysis' ``compute`` gets.

    Attributes:
        model: the loaded model.
        tokens: the main token batch (corpus and seed recorded); for a ``split`` analysis on one
            shard, that shard of it.
        heavy: its first ``config.heavy_sequences`` sequences (the costly analyses' batch); for a
            ``split`` analysis of the heavy batch on one shard, that shard of it.
        config: the study's settings.
        progress: show progress bars.
        work_dir: a folder of the task's own for intermediate state (checkpoints), inside the
            study folder's private area; removed when the task's result is stored.
        done: the finished results of the analyses it ``needs`` (those in the study).
        first_sequence: for a ``split`` analysis run on one shard, the number of its batch's first
            sequence in the whole batch; else 0.
    """

    model: Any
    tokens: TokenBatch
    heavy: TokenBatch
    config: StudyConfig
    progress: bool
    work_dir: Path
    done: dict[str, Result]
    first_sequence: int = 0


@dataclass(frozen=True)
class Finishing:
    """What an analysis' ``finish`` gets (no model: it runs where the study's tables are put
    together, in the study, in ``merge`` or on a Ray driver).

    Attributes:
        config: the study's settings.
        done: the finished results of the analyses it ``needs`` and ``reads`` (those in the study).
    """

    config: StudyConfig
    done: dict[str, Result]


def whole(parts: list[Tables], fin: Finishing) -> Tables:
    """The ``finish`` of an analysis that runs as one task: its tables as they are.

    Example:
        >>> t = {"n": pd.DataFrame({"n": [1]})}
        >>> whole([t], Finishing(None, {})) is t
        True
    """
    if len(parts) != 1:
        raise ValueError(f"an analysis that is not split runs as one task; got {len(parts)} sets of tables")
    return parts[0]


@dataclass
class Study:
    """What a study made: results per model and analysis, stage placements, the report.

    Attributes:
        config: the study's settings.
        out_dir: its folder.
        results: model name -> analysis -> :class:`~stages_of_inference.results.Result`, in the
            study's order.
        stages: model name -> stage table (:func:`stages_of_inference.stages.placement.place_stages`).
        timings: model name -> analysis -> seconds spent (0 where a finished result was reused).
        reused: ``(model, analysis)`` pairs read back from ``out_dir``.
        left_out: ``(model, analysis)`` pairs not run: the analysis was registered as needing a
            ``HookedTransformer`` and the model ran on the TransformerBridge.
        figures: figure name -> plotly figure (once the report is built).
        readings: figure name -> the written reading of it.
        static_note: what became of the static figures.
    """

    config: StudyConfig
    out_dir: Path
    results: dict[str, dict[str, Result]] = field(default_factory=dict)
    stages: dict[str, pd.DataFrame] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    reused: list[tuple[str, str]] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict, repr=False)
    readings: dict[str, str] = field(default_factory=dict, repr=False)
    static_note: str = ""

    @property
    def report(self) -> Path:
        """The report's path."""
        return self.out_dir / "report.html"


@dataclass(frozen=True)
class Figure:
    """One figure of the report: a name (its anchor and file name), a title, how to draw it and
    its written reading (HTML).
    """

    name: str
    title: str
    draw: Callable[[], Any]
    reading: Callable[[], str]


@dataclass(frozen=True)
class Style:
    """What every figure of one report shares: the stage tables (bands) and the model colours."""

    stages: list[pd.DataFrame] | None
    colors: dict[str, str]


@dataclass(frozen=True)
class Analysis:
    """One analysis of the study.

    Attributes:
        name: its name (its folder under each model, its ``--analyses`` name).
        compute: runs it: a :class:`Context` to named tables.
        settings: the settings that determine its numbers, from the study's config.
        tokens: which batch it reads: ``"main"``, ``"heavy"`` or ``"none"`` (weights or prompts).
        figures: its figures for a study's results (none where the study has no result of it).
        fast: part of the ``fast`` selection (one forward pass or the weights, plus the sweep).
        default: part of a default study (``all``).
        bridge: runs on the ``TransformerBridge`` backend (every built-in analysis does; an
            analysis registered with ``False`` needs a ``HookedTransformer``, and a study on the
            Bridge leaves it out and says so: :func:`runs_on`).
        split: ``compute`` can run on shards of its token batch (``ctx.tokens`` or ``ctx.heavy``
            is then one shard, ``ctx.first_sequence`` its first sequence's number) and returns
            additive tables (sums and counts per sequence, never means); ``finish`` pools the
            shards' tables. A distributed study splits only these (docs/distributed/).
        finish: puts the tables of the analysis' tasks together (one task unless ``split``), and
            may add what it reads from the finished analyses it ``reads`` (``Finishing.done``):
            cheap, and without the model. Default: the one task's tables as they are.
        needs: analyses whose finished results ``compute`` reads from ``ctx.done``: its task
            waits for them (when they are part of the study). They must not be ``split``.
        reads: analyses whose finished results ``finish`` reads from ``Finishing.done``: the
            analysis is finished after them, its task does not wait for them.
    """

    name: str
    compute: Callable[[Context], Tables]
    settings: Callable[[StudyConfig], dict[str, Any]] = lambda config: {}
    tokens: Literal["main", "heavy", "none"] = "main"
    figures: Callable[[Study, Style], list[Figure]] = lambda study, style: []
    fast: bool = False
    default: bool = True
    bridge: bool = True
    split: bool = False
    finish: Callable[[list[Tables], Finishing], Tables] = whole
    needs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()


REGISTRY: dict[str, Analysis] = {}
"""Every analysis the study knows, by name, in the order a study runs them."""


def register(analysis: Analysis, *, replace: bool = False) -> Analysis:
    """Add ``analysis`` to :data:`REGISTRY` (after the ones there); a taken name is refused
    unless ``replace``.

    Example:
        >>> a = register(Analysis("demo_count", lambda ctx: {"n": pd.DataFrame({"n": [len(ctx.tokens)]})},
        ...                       default=False))
        >>> "demo_count" in REGISTRY
        True
        >>> _ = REGISTRY.pop("demo_count")
    """
    if not isinstance(analysis, Analysis):
        raise TypeError(f"register takes an Analysis, got {type(analysis).__name__}")
    if not isinstance(analysis.name, str) or not analysis.name.isidentifier():
        raise ValueError(f"an analysis name is a Python identifier (its folder and --analyses name), got {analysis.name!r}")
    if analysis.name in REGISTRY and not replace:
        raise ValueError(f"an analysis named {analysis.name!r} is registered already (pass replace=True to replace it)")
    if analysis.tokens not in ("main", "heavy", "none"):
        raise ValueError(f"tokens must be 'main', 'heavy' or 'none', got {analysis.tokens!r}")
    if analysis.split and analysis.tokens == "none":
        raise ValueError(f"{analysis.name}: a split analysis reads a token batch (tokens 'main' or 'heavy'), not 'none'")
    for need in analysis.needs:
        if need not in REGISTRY or REGISTRY[need].split:
            raise ValueError(f"{analysis.name} needs {need!r}, which is not an analysis registered before it "
                             "that runs as one task (needs name earlier analyses that are not split)")
    for read in analysis.reads:
        if read not in REGISTRY:
            raise ValueError(f"{analysis.name} reads {read!r}, which is not an analysis registered before it")
    REGISTRY[analysis.name] = analysis
    return analysis


def runs_on(analysis: Analysis, backend: str) -> bool:
    """Whether ``analysis`` runs on a model of ``backend`` (``"hooked"``, ``"bridge"``): the one
    rule for what a study on the Bridge leaves out.

    Example:
        >>> runs_on(Analysis("a", lambda ctx: {}, bridge=False), "bridge"), runs_on(Analysis("a", lambda ctx: {}), "bridge")
        (False, True)
    """
    return analysis.bridge or backend != "bridge"


def tables_of(study: Study, analysis: str, key: str) -> list[pd.DataFrame]:
    """Table ``key`` of ``analysis`` for every model of the study that has it, in model order."""
    return [done[analysis].tables[key] for done in study.results.values()
            if analysis in done and key in done[analysis].tables]


def one_figure(name: str, title: str, analysis: str, key: str, draw: Callable[[list[pd.DataFrame], Style], Any],
               read: Callable[[Study], str]) -> Callable[[Study, Style], list[Figure]]:
    """The ``figures`` of an analysis drawn as one figure of its table ``key``, one per model:
    ``draw(tables, style)`` makes it, ``read(study)`` writes its reading.
    """
    def figures(study: Study, style: Style) -> list[Figure]:
        tables = tables_of(study, analysis, key)
        return [Figure(name, title, lambda: draw(tables, style), lambda: read(study))] if tables else []
    return figures


def default_analyses() -> tuple[str, ...]:
    """What ``--analyses all`` (and a default study) runs: every registered analysis marked default."""
    return tuple(name for name, a in REGISTRY.items() if a.default)


def fast_analyses() -> tuple[str, ...]:
    """A cheap subset (one forward pass each, or the weights only, plus the sweep) for quick checks."""
    return tuple(name for name, a in REGISTRY.items() if a.fast)
