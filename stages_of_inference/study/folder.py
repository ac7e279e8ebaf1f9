"""The folder a study owns, and nothing else.

A study folder holds what a study writes (``study.json``, ``report.html``, ``figures/``,
``<model>/<analysis>/`` result folders; a ``--shard`` run's ``shard-I-of-N.json``) and one private
folder, ``.stages-of-inference/``, made first, which marks the folder as a study's and holds
everything the study keeps for itself::

    .stages-of-inference/
      folder.json     the marker: which library made the folder, and when
      lock            held by the run using the folder (never followed through a symbolic
                      link; removed when the run ends)
      tmp/            temporaries of atomic writes (a killed run's are removed by the next run)
      work/           tasks' checkpoints while they run (removed when each task is stored)
      tasks/          finished task results (docs/distributed/): a --shard run's output;
                      removed once a study is finished

The library deletes or replaces only what it created: its private folder's contents, and result
folders that carry its provenance. A folder that is not empty and is not a study folder is
refused in one line unless the caller adopts it (``adopt=True``, ``--adopt-folder``); a user's
file or folder that stands where the study would write is never deleted: the run is refused,
naming it, before any model is loaded.

:func:`load_study` reads a finished study back with the same folder names the writer used
(:func:`study_slugs`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages_of_inference import __version__
from stages_of_inference._utils import atomic_write_json, file_lock
from stages_of_inference.results import PROVENANCE_FILE, DamagedResultError, Result
from stages_of_inference.stages.bootstrap import PerSequence, boundary_intervals
from stages_of_inference.stages.placement import place_stages
from stages_of_inference.study.config import StudyConfig
from stages_of_inference.study.registry import REGISTRY, Study, runs_on

__all__ = ["FIGURES_DIR", "PRIVATE_DIR", "REPORT_FILE", "REPORT_GENERATOR", "STUDY_FILE", "FolderError",
           "StudyFolder", "StudyMismatchError", "load_if_matching", "load_study", "model_stages", "slug", "study_slugs",
           "study_writes"]

STUDY_FILE = "study.json"
"""The study's settings, written when it is finished."""
REPORT_FILE = "report.html"
"""The report."""
REPORT_GENERATOR = '<meta name="generator" content="stages-of-inference">'
"""The line that marks a report as this library's (a report.html without it is never replaced)."""
FIGURES_DIR = "figures"
"""Static copies of the figures."""
PRIVATE_DIR = ".stages-of-inference"
"""The study's private folder (module docstring)."""
MARKER_FILE = "folder.json"
RESULT_SUFFIXES = (".parquet", ".csv", ".json")


class FolderError(ValueError):
    """A folder the study may not use as it is (not a study folder, or a user's file where the
    study would write): one line naming it and what to do.
    """


class StudyMismatchError(ValueError):
    """A finished analysis in the folder was made with other settings, and ``on_mismatch="error"``."""


def slug(name: str) -> str:
    """A model name as a folder name.

    Example:
        >>> slug("smollm2-135m"), slug("/models/My Model.gguf")
        ('smollm2-135m', 'My_Model.gguf')
    """
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(str(name)).name or str(name))
    return keep.strip("._") or "model"


def study_slugs(models: Sequence[str]) -> dict[str, str]:
    """Each model's folder name in the study folder, in the study's order (two names with one
    slug get ``_`` suffixes, the later one the longer name): writer and reader use this one map.

    Example:
        >>> study_slugs(("a/m", "b/m"))
        {'a/m': 'm', 'b/m': 'm_'}
    """
    slugs: dict[str, str] = {}
    for name in models:
        candidate = slug(name)
        while candidate in slugs.values():
            candidate += "_"
        slugs[name] = candidate
    return slugs


def _is_result_folder(path: Path) -> bool:
    """A folder this library wrote as a saved result: a ``provenance.json`` and nothing but
    table, sidecar and provenance files (a damaged one included).
    """
    if path.is_symlink() or not path.is_dir() or not os.path.lexists(path / PROVENANCE_FILE):
        return False
    return all(p.suffix in RESULT_SUFFIXES and (p.is_symlink() or not p.is_dir()) for p in path.iterdir())


def _is_our_report(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    return REPORT_GENERATOR in head or "<title>Stages of inference:" in head


def _is_study_file(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    try:
        StudyConfig.from_json(path.read_text())
    except (OSError, ValueError, TypeError):
        return False
    return True


class StudyFolder:
    """A study's folder and the paths in it (module docstring). :meth:`held` claims it for one run.

    Example:
        >>> f = StudyFolder("/data/study")
        >>> f.result_dir("m", "neurons"), f.tasks
        (PosixPath('/data/study/m/neurons'), PosixPath('/data/study/.stages-of-inference/tasks'))
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()

    private = property(lambda self: self.path / PRIVATE_DIR, doc="The study's private folder.")
    tmp = property(lambda self: self.private / "tmp", doc="Temporaries of atomic writes.")
    work = property(lambda self: self.private / "work", doc="Tasks' checkpoints while they run.")
    tasks = property(lambda self: self.private / "tasks", doc="Finished task results.")
    lock = property(lambda self: self.private / "lock", doc="The lock file.")
    report = property(lambda self: self.path / REPORT_FILE, doc="The report.")

    def result_dir(self, model_slug: str, analysis: str) -> Path:
        """Where a finished analysis of a model is saved."""
        return self.path / model_slug / analysis

    def is_study_folder(self) -> bool:
        """Whether the folder is marked as a study's (its private folder, or a ``study.json`` of
        an earlier version of the library).
        """
        return (self.private.is_dir() and not self.private.is_symlink()) or _is_study_file(self.path / STUDY_FILE)

    # ------------------------------------------------------------------ claiming
    @contextlib.contextmanager
    def held(self, *, adopt: bool = False, writes: Sequence[str] = (), say: Callable[[str], None] = print,
             keep_tasks: bool = False) -> Iterator[StudyFolder]:
        """Claim the folder for one run: create it (or check it is a study folder, or adopt it),
        check that nothing of the user's stands at the names in ``writes`` (relative paths the
        run will write), mark it, hold its lock (a second run is refused in one line), remove
        what a killed run left half-written. When the run ends, its temporaries and the lock are
        removed; when it ends well, its work folder too (and the task results unless
        ``keep_tasks``), while an interrupted run keeps its checkpoints and stored task results
        for the next run to resume from. A folder this run created and left holding nothing is
        removed.
        """
        created = not self.path.exists()
        adopting = not created and not self.is_study_folder()
        self._claim(adopt)
        self.check_writes(writes, adopting=adopting)
        finished = False
        try:
            self.private.mkdir(parents=True, exist_ok=True)
            with file_lock(self.lock, what=f"the study folder {self.path}"):
                self._mark()
                for stale in self._clear(self.tmp):
                    say(f"removed {stale}, left half-written by an interrupted run")
                self.tmp.mkdir(exist_ok=True)
                yield self
                finished = True
                if not keep_tasks:
                    shutil.rmtree(self.tasks, ignore_errors=True)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if finished:  # an interrupted run keeps its checkpoints: the next one resumes from them
                shutil.rmtree(self.work, ignore_errors=True)
            if created and self._holds_nothing():
                shutil.rmtree(self.path, ignore_errors=True)

    def _holds_nothing(self) -> bool:
        """Whether the folder holds nothing but its marker (a run that wrote nothing)."""
        if not self.path.is_dir() or {p.name for p in self.path.iterdir()} - {PRIVATE_DIR}:
            return False
        return not self.private.is_dir() or {p.name for p in self.private.iterdir()} <= {MARKER_FILE}

    def _claim(self, adopt: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"the study folder {self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        private = self.private
        if private.is_symlink() or (private.exists() and not private.is_dir()):
            raise FolderError(f"{private} is not the study's private folder (a link or a file stands there); "
                              "remove it, or use another folder")
        if self.is_study_folder():
            return
        entries = sorted(p.name for p in self.path.iterdir())
        if entries and not adopt:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise FolderError(f"{self.path} is not empty ({shown}) and is not a study folder; give a new or empty "
                              "folder, or adopt this one (--adopt-folder, adopt=True): the study then writes beside "
                              "your files and never touches them")

    def check_writes(self, writes: Sequence[str], adopting: bool = False) -> None:
        """Refuse, naming it, anything of the user's at a name the run writes: in a folder being
        adopted, anything at all there; in a study folder, a result folder that does not carry
        this library's provenance, a report that is not its report, a ``study.json`` that is not a
        study's settings, a file where a folder goes.
        """
        for name in writes:
            path = self.path / name
            if not os.path.lexists(path):
                continue
            if adopting:
                ours = False
            elif name == STUDY_FILE or name.startswith("shard-"):
                ours = path.is_file() and not path.is_symlink() and (name != STUDY_FILE or _is_study_file(path))
            elif name == REPORT_FILE:
                ours = _is_our_report(path)
            elif name == FIGURES_DIR or "/" not in name:
                ours = path.is_dir() and not path.is_symlink()
            else:
                ours = _is_result_folder(path)
            if not ours:
                raise FolderError(f"{path} is in the way: the study writes {name} there and it is not the study's "
                                  "own; move it, or use another folder (the study never deletes what it did not write)")

    def _mark(self) -> None:
        marker = self.private / MARKER_FILE
        if not marker.is_file():
            atomic_write_json(marker, {"made_by": f"stages_of_inference {__version__}",
                                       "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    @staticmethod
    def _clear(folder: Path) -> list[Path]:
        """Remove a private folder's entries; return them."""
        if not folder.is_dir():
            return []
        removed = sorted(folder.iterdir())
        for entry in removed:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        return removed

    # ------------------------------------------------------------------ writing
    def save_result(self, result: Result, model_slug: str, analysis: str, fmt: str) -> Path:
        """Save a finished analysis as ``<model>/<analysis>/`` (replacing only a result folder of
        this library's), through the private temporary folder.
        """
        where = self.result_dir(model_slug, analysis)
        self.check_writes([model_slug, f"{model_slug}/{analysis}"])
        return result.save(where, fmt=fmt, tmp_dir=self.tmp)

    def write_json(self, name: str, data: Any) -> Path:
        """Write one of the study's JSON files (``study.json``, a shard record) atomically."""
        self.check_writes([name])
        return atomic_write_json(self.path / name, data, tmp_dir=self.tmp)


def study_writes(config: StudyConfig) -> list[str]:
    """The names (relative paths) a study writes in its folder: its settings, the report, the
    figures, and a folder per model and analysis.

    Example:
        >>> study_writes(StudyConfig(analyses=("neurons",)))
        ['study.json', 'report.html', 'figures', 'smollm2-135m', 'smollm2-135m/neurons']
    """
    names = [STUDY_FILE, REPORT_FILE, FIGURES_DIR]
    for model_slug in study_slugs(config.models).values():
        names += [model_slug, *(f"{model_slug}/{a}" for a in config.analyses)]
    return names


def load_if_matching(folder: Path, fingerprint: dict[str, Any], on_mismatch: str,
                     say: Callable[[str], None]) -> Result | None:
    """The finished result in ``folder`` if its fingerprint matches and it reads back intact; a
    damaged one is named (one line) and recomputed; another run's is recomputed or refused.
    """
    meta = folder / PROVENANCE_FILE
    if not os.path.lexists(meta):
        return None
    try:
        result = Result.load(folder)
    except DamagedResultError as error:
        say(f"  {folder.name}: {error}; recomputing it")
        return None
    found = result.provenance.get("study_fingerprint")
    if found == fingerprint:
        return result
    if on_mismatch == "error":
        found = found if isinstance(found, dict) else {}
        diffs = [k for k in sorted(set(fingerprint) | set(found)) if found.get(k) != fingerprint.get(k)]
        raise StudyMismatchError(
            f"{folder} holds a finished analysis made with other settings (differs in: {', '.join(diffs) or 'all'}); "
            "use another out_dir, or on_mismatch='recompute' to replace it")
    return None


def model_stages(done: dict[str, Result], name: str, n_layers: int, resamples: int = 0, seed: int = 0) -> pd.DataFrame:
    """Where one model's finished results place the four stages (empty without the analyses
    the rule reads: the sweep, the paper-convention lens, the neurons, the attention); with
    ``resamples``, each stage's first block has a bootstrap interval over sequences
    (``first_layer_low``, ``first_layer_high``, ``start_low``, ``start_high``) and the table's
    ``attrs["intervals"]`` holds every boundary's (:func:`~stages_of_inference.stages.bootstrap.boundary_intervals`).
    """
    def table(analysis: str, key: str) -> pd.DataFrame | None:
        return done[analysis].tables.get(key) if analysis in done else None

    lenses = table("logit_lens", "lens")
    lens = None if lenses is None else lenses[lenses["convention"] == "paper"]
    inputs = dict(sweep=table("robustness", "summary"), lens=lens, neurons=table("neurons", "counts"),
                  attention=table("previous_token_attention", "attention"))
    if all(v is None for v in inputs.values()) or not n_layers:
        return pd.DataFrame()
    stages = place_stages(**inputs, n_layers=n_layers)
    stages["model"] = name
    stages["lens_convention"] = "paper" if lens is not None and len(lens) else "none"
    every = [t for t in (lenses, table("tuned_lens", "lens"), table("jacobian_lens", "lens")) if t is not None]
    if every:  # where each lens would place the stages (the rule reads the paper's; the tuned lens's table joins)
        both = pd.concat(every, ignore_index=True)
        stages.attrs["by_lens"] = {
            convention: place_stages(**{**inputs, "lens": both[both["convention"] == convention]},
                                     n_layers=n_layers)["first_layer"].tolist()
            for convention in dict.fromkeys(both["convention"])}
    samples = per_sequence_values(done, n_layers)
    if resamples and samples is not None:
        intervals = boundary_intervals(samples, n_layers, neurons=inputs["neurons"], resamples=resamples, seed=seed)
        by_lens = stages.attrs.get("by_lens")
        stages = with_intervals(stages, intervals, n_layers)
        if by_lens:
            stages.attrs["by_lens"] = by_lens
            stages.attrs["by_lens_intervals"] = _by_lens_intervals(done, samples, n_layers, inputs["neurons"],
                                                                   resamples, seed)
    return stages


def _by_lens_intervals(done: dict[str, Result], samples: PerSequence, n_layers: int, neurons: pd.DataFrame | None,
                       resamples: int, seed: int) -> dict[str, dict[str, tuple[int, int]]]:
    """Per lens the finished results read the heavy batch through: the 90 % interval of each
    stage's first block when the rule reads that lens's entropy (the same resamples, the same
    deletion KL, attention and neuron counts).
    """
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for analysis in ("logit_lens", "tuned_lens", "jacobian_lens"):
        table = done[analysis].tables.get("per_sequence") if analysis in done else None
        if table is None:
            continue
        for convention, rows in table.groupby("convention", sort=False):
            entropy = _pivot(rows, "entropy_bits")
            if len(entropy) < 2:
                continue
            one = PerSequence(drop_kl=samples.drop_kl, lens_entropy=entropy, attention=samples.attention)
            found = boundary_intervals(one, n_layers, neurons=neurons, resamples=resamples, seed=seed)
            rule = found[found["boundary"].str.startswith("rule: ")]
            out[str(convention)] = {row.boundary[len("rule: "):]: (int(row.low), int(row.high))
                                    for row in rule.itertuples()}
    return out


def _pivot(table: pd.DataFrame, column: str, across: str = "layer") -> np.ndarray:
    """A long per-sequence table as a ``[sequence, layer]`` array."""
    return table.pivot(index="sequence", columns=across, values=column).sort_index(axis=0).sort_index(axis=1).to_numpy(float)


def per_sequence_values(done: dict[str, Result], n_layers: int) -> PerSequence | None:
    """The per-sequence values a model's finished results keep, for the bootstrap (``None``
    where there are none: results written before they were kept, or none of the analyses).
    """
    values: dict[str, np.ndarray] = {}
    sweep = done["robustness"].tables.get("per_token") if "robustness" in done else None
    if sweep is not None:
        drops = sweep[sweep["kind"] == "drop"]
        values["drop_kl"] = _pivot(drops.groupby(["sequence", "layer"], as_index=False)["kl_nats"].mean(), "kl_nats")
    lens = done["logit_lens"].tables.get("per_sequence") if "logit_lens" in done else None
    if lens is not None:
        values["lens_entropy"] = _pivot(lens[lens["convention"] == "paper"], "entropy_bits")
        depth = lens[lens["convention"] == "per_layer_norm"]
        values["depth_counts"] = _pivot(depth.assign(n=depth["depth_right"] + depth["depth_wrong"]), "n")
    attention = done["previous_token_attention"].tables.get("per_sequence") if "previous_token_attention" in done else None
    if attention is not None:
        values["attention"] = _pivot(attention, "mean_attention")
    readings = done["competing_readings"].tables.get("per_sequence") if "competing_readings" in done else None
    if readings is not None:
        values["bos_norm"] = _pivot(readings, "bos_norm", "readout")
        values["matrix_entropy"] = _pivot(readings, "matrix_entropy", "readout")
    values = {k: v for k, v in values.items() if len(v) >= 2}
    if "bos_norm" not in values or "matrix_entropy" not in values:
        values.pop("bos_norm", None), values.pop("matrix_entropy", None)
    return PerSequence(**values) if values else None


def with_intervals(stages: pd.DataFrame, intervals: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """The stage table with each stage's first block's interval (detokenization's is ``[0, 0]``);
    an end of -1 (the stage got no block in more than ``(1 - level) / 2`` of the resamples) has no
    start depth (NaN), and the figure then draws no whisker.
    """
    out = stages.copy()
    rule = intervals[intervals["boundary"].str.startswith("rule: ")].set_index("boundary")
    scale = max(n_layers - 1, 1)
    low, high = [], []
    for row in out.itertuples():
        key = f"rule: {row.stage}"
        low.append(int(rule.loc[key, "low"]) if key in rule.index else int(row.first_layer))
        high.append(int(rule.loc[key, "high"]) if key in rule.index else int(row.first_layer))
    out["first_layer_low"], out["first_layer_high"] = low, high
    # -1: the stage got no block in those resamples, so that end of the interval has no depth
    out["start_low"] = [max(0.0, (v - 0.5) / scale) if v > 0 else 0.0 if v == 0 else np.nan for v in low]
    out["start_high"] = [max(0.0, (v - 0.5) / scale) if v > 0 else 0.0 if v == 0 else np.nan for v in high]
    out.attrs = {**stages.attrs, "intervals": intervals}
    return out


def load_study(out_dir: str | os.PathLike[str]) -> Study:
    """Read a finished study back from its folder (its ``study.json`` and result folders, named
    as the writer named them: :func:`study_slugs`).

    Example:
        >>> load_study("reports/smollm2-135m").config.models  # doctest: +SKIP
        ('smollm2-135m',)
    """
    folder = StudyFolder(out_dir)
    meta = folder.path / STUDY_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"{folder.path} holds no study (no study.json)")
    config = StudyConfig.from_json(meta.read_text())
    study = Study(config=config, out_dir=folder.path)
    for name, model_slug in study_slugs(config.models).items():
        done = {a: Result.load(folder.result_dir(model_slug, a)) for a in config.analyses
                if (folder.result_dir(model_slug, a) / PROVENANCE_FILE).is_file()}
        study.results[name] = done
        records = [r.provenance.get("model", {}) for r in done.values()]
        n_layers = next((int(m["n_layers"]) for m in records if m.get("n_layers")), 0)
        if done and n_layers:
            study.stages[name] = model_stages(done, name, n_layers, config.bootstrap, config.seed)
        backend = next((m["backend"] for m in records if m.get("backend")), None)
        study.left_out += [(name, a) for a in config.analyses
                           if a not in done and a in REGISTRY and backend and not runs_on(REGISTRY[a], backend)]
    return study
