"""The whole study in one call: every analysis for one or more models, and a self-contained report.

:func:`run_study` loads each model and one token batch of the corpus, runs every analysis of the
four stages (the robustness sweep, previous-token attention, subjoiner heads, the logit lens in
both conventions, layer similarity, probes, prediction / suppression neurons, the sharpening
profile with final-block deletions, and layer repetition), places the stages
(:func:`stages_of_inference.stages.placement.place_stages`) and writes ``out_dir``::

    out_dir/
      study.json                   the StudyConfig of the run (drives `stages-of-inference run`)
      report.html                  figures (plotly, embedded once), readings, provenance, settings
      figures/<name>.png           static figures, only where a static exporter (kaleido) works
      <model>/<analysis>/          one folder per analysis: <table>.parquet (or .csv), its
                                   <table>.parquet.json provenance, and provenance.json
      tasks/                       while a distributed study runs: its finished task results
                                   (docs/distributed/), removed when the study is finished

Every write is atomic (a temporary file or folder, then a rename). A study interrupted and started
again with the same ``out_dir`` reuses each finished analysis whose recorded fingerprint (model
name, config and weights hashes, the token batch's digest, and the analysis' settings) matches
this run's; an analysis whose fingerprint differs is recomputed (``on_mismatch="recompute"``, the
default) or refused (``on_mismatch="error"``). The robustness sweep also checkpoints each batch
of sequences, so an interrupted sweep resumes mid-way.

Token budgets. ``n_tokens`` (default 1,024: 8 sequences of 128) is the batch of the robustness
sweep, the attention, similarity and probe analyses; the logit lens (two conventions), the
sharpening profile, the final-block deletions and layer repetition, which unembed every layer or
run many plans, use the first half of the sequences (docs/report.md lists the costs).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from stages_of_inference._checks import check_output_path
from stages_of_inference._tl import Model
from stages_of_inference._utils import atomic_write_json, file_lock, remove_stale_temporaries
from stages_of_inference.backends import backend_of
from stages_of_inference.batch import TokenBatch, token_digest
from stages_of_inference.data import load_token_batch
from stages_of_inference.results import (
    PROVENANCE_FILE,
    DamagedResultError,
    Result,
    config_hash,
    model_name,
    weights_hash,
)
from stages_of_inference.stages.placement import place_stages
from stages_of_inference.study.config import DEFAULT_OUT_DIR, StudyConfig
from stages_of_inference.study.html import build_report
from stages_of_inference.study.registry import REGISTRY, Analysis, Context, Finishing, Tables

__all__ = ["STUDY_FILE", "Study", "StudyMismatchError", "batch_identity", "finished_result", "fingerprint", "load_study", "run_study", "slug"]

STUDY_FILE = "study.json"
"""The study's settings, in its folder."""

LOCK_FILE = ".lock"
"""Held by the run using a study folder."""


def slug(name: str) -> str:
    """A model name as a folder name.

    Example:
        >>> slug("smollm2-135m"), slug("/models/My Model.gguf")
        ('smollm2-135m', 'My_Model.gguf')
    """
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(str(name)).name or str(name))
    return keep.strip("._") or "model"


@dataclass
class Study:
    """What :func:`run_study` made: results per model and analysis, stage placements, the report.

    Attributes:
        config: the study's settings.
        out_dir: where everything was written.
        results: model name -> analysis -> :class:`~stages_of_inference.results.Result`.
        stages: model name -> stage table (:func:`stages_of_inference.stages.placement.place_stages`).
        timings: model name -> analysis -> seconds spent (0 where a finished result was reused).
        reused: ``(model, analysis)`` pairs read back from ``out_dir``.
        left_out: ``(model, analysis)`` pairs not run: the analysis was registered as needing a
            ``HookedTransformer`` and the model ran on the TransformerBridge (:func:`load_study`
            reads it back from the results' provenance, which records the backend).
        figures: figure name -> plotly figure.
        readings: figure name -> the written reading of it.
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


class StudyMismatchError(ValueError):
    """A finished analysis in ``out_dir`` was made with other settings, and ``on_mismatch="error"``."""



def batch_identity(batch: TokenBatch) -> dict[str, Any]:
    """What a fingerprint records of a token batch: its seed, digest and shape.

    Example:
        >>> import torch
        >>> sorted(batch_identity(TokenBatch(torch.tensor([[0, 1, 2]]), corpus="default", seed=3)))
        ['seed', 'tokens_sha256', 'tokens_shape']
    """
    return {"seed": batch.seed, "tokens_sha256": token_digest(batch.tokens), "tokens_shape": list(batch.shape)}


def fingerprint(analysis: Analysis, config: StudyConfig, model_id: dict[str, Any],
                batches: dict[str, TokenBatch] | dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What a finished analysis' numbers depend on: the model, the corpus, the token batch it
    read (digest and shape) and its registry settings. A result is reused only when it matches.
    ``batches`` holds the token batches, or their :func:`batch_identity` (what a Ray driver,
    which loads no model, knows of them).
    """
    data: dict[str, Any] = {"corpus": config.corpus}
    if analysis.tokens != "none":
        batch = batches[analysis.tokens]
        data.update(batch if isinstance(batch, dict) else batch_identity(batch))
    return {"analysis": analysis.name, **model_id, **data, "settings": analysis.settings(config)}


def finished_result(analysis: Analysis, parts: list[Tables], config: StudyConfig, done: dict[str, Result],
                    study_fp: dict[str, Any], batch_record: dict[str, Any] | None, seconds: float) -> Result:
    """An analysis' finished result from the tables of its tasks, with the study's provenance:
    the model's name, the batch it read (corpus, seed, digest), its fingerprint and the settings.
    """
    tables = analysis.finish(parts, Finishing(config, done))
    record = dict(next(iter(tables.values())).attrs.get("provenance", {}))
    record["model"] = {**record.get("model", {}), "name": study_fp["model"]}
    if batch_record is not None:  # the batch it read, with its corpus and seed, stated explicitly
        record["tokens"] = batch_record
    record["study_fingerprint"] = study_fp
    record["study"] = config.to_dict()
    record["study_seconds"] = round(seconds, 1)
    return Result({k: v.copy() for k, v in tables.items()}, record)


def _load_if_matching(folder: Path, fingerprint: dict[str, Any], on_mismatch: str,
                      say: Callable[[str], None]) -> Result | None:
    """The finished result in ``folder`` if its fingerprint matches and it reads back intact; a
    damaged one is named (one line) and recomputed; another run's is recomputed or refused.
    """
    meta = folder / PROVENANCE_FILE
    if not meta.exists():
        return None
    try:
        found = json.loads(meta.read_text()).get("study_fingerprint")
    except (OSError, ValueError, AttributeError) as error:
        say(f"  {folder.name}: {meta} cannot be read ({type(error).__name__}); recomputing it")
        return None
    if found == fingerprint:
        try:
            return Result.load(folder)
        except DamagedResultError as error:
            say(f"  {folder.name}: {error}; recomputing it")
            return None
    if on_mismatch == "error":
        diffs = [k for k in sorted(set(fingerprint) | set(found or {})) if (found or {}).get(k) != fingerprint.get(k)]
        raise StudyMismatchError(
            f"{folder} holds a finished analysis made with other settings (differs in: {', '.join(diffs) or 'all'}); "
            "use another out_dir, or on_mismatch='recompute' to replace it"
        )
    return None


def run_study(
    models: str | Model | Sequence[str | Model] = ("smollm2-135m",),
    corpus: str = "default",
    n_tokens: int = 1024,
    out_dir: str | Path = DEFAULT_OUT_DIR,
    *,
    analyses: Sequence[str] | None = None,
    config: StudyConfig | None = None,
    on_mismatch: str = "recompute",
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    write_report: bool = True,
    precision: str = "fp32",
    engine: str = "local",
    ray_address: str | None = None,
    ray_options: Any = None,
) -> Study:
    """Run every analysis of the four stages on each model and write a self-contained report.

    Args:
        models: one model or several: names (embedded keys such as ``"smollm2-135m"`` and
            ``"gemma3-270m"``, TransformerLens names where the hub is reachable, folders, ``.gguf``
            files) or already loaded ``HookedTransformer`` or ``TransformerBridge`` objects (with a tokenizer), which are
            known in the study by their name (``load_model`` records it).
        corpus: a bundled corpus name (``"default"``, ``"austen"``, ``"melville"``), a text file or a
            folder of ``.txt`` files.
        n_tokens: tokens in the main batch (sequences of 128, BOS first); the expensive analyses use
            half of it (module docstring).
        out_dir: the study's folder (created; reused on a rerun).
        analyses: which analyses to run (names in :data:`~stages_of_inference.study.registry.REGISTRY`;
            default: every default one).
        config: full settings; when given, ``corpus``, ``n_tokens``, ``analyses`` and ``precision`` are ignored,
            and the models are ``config.models`` (loaded models passed in ``models`` are used for
            the names they carry).
        on_mismatch: ``"recompute"`` a finished analysis made with other settings, or ``"error"``.
        progress: progress bars.
        log: where one line per step goes (``None``: silent).
        write_report: write ``report.html`` (and static figures) at the end.
        precision: ``"fp32"`` (the paper's setting), ``"bf16"`` or ``"fp16"``: the dtype of the models'
            matrix products and attention in every analysis (:mod:`stages_of_inference.precision`);
            the report then says how far the sweep's numbers moved from fp32.
        engine: ``"local"`` (this process, one model at a time) or ``"ray"``: tasks on a Ray
            cluster (:mod:`stages_of_inference.study.distributed`; needs the ``ray`` extra), the
            same tables within fp32 rounding (docs/distributed/).
        ray_address: with ``engine="ray"``: ``None`` starts a local cluster with this machine's
            cores, ``"auto"`` joins the one running here, ``"host:port"`` joins that head.
        ray_options: with ``engine="ray"``: a :class:`~stages_of_inference.study.distributed.RayOptions`
            (workers, CPUs and GPUs per worker, shards, retries); ``ray_address`` overrides its address.

    Returns:
        A :class:`Study`; the report is at ``study.report``.

    Example:
        >>> study = run_study("smollm2-135m", n_tokens=512, out_dir="/tmp/soi-study",
        ...                   analyses=("robustness",), progress=False)  # doctest: +SKIP
        >>> study.report.name  # doctest: +SKIP
        'report.html'
    """
    given = [models] if isinstance(models, str) or not isinstance(models, Sequence) else list(models)
    loaded = {model_name(m): m for m in given if not isinstance(m, str)}
    if config is None:
        config = StudyConfig(models=tuple(m if isinstance(m, str) else model_name(m) for m in given), corpus=corpus,
                             n_tokens=n_tokens, precision=precision,
                             **({} if analyses is None else {"analyses": tuple(analyses)}))
    if on_mismatch not in ("recompute", "error"):
        raise ValueError(f"on_mismatch must be 'recompute' or 'error', got {on_mismatch!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    say = log or (lambda _: None)
    out = check_output_path(out_dir, "out_dir folder")
    if engine == "ray":
        return _run_on_ray(config, out, loaded, on_mismatch, write_report, say, ray_address, ray_options)
    study = Study(config=config, out_dir=out)
    started = time.perf_counter()
    with _study_folder(out, say):
        _run_models(study, loaded, on_mismatch, progress, say)
    say(f"all analyses done in {time.perf_counter() - started:.0f} s")
    # written last: a run refused or interrupted part-way leaves the folder's record as it was
    atomic_write_json(out / STUDY_FILE, config.to_dict())
    if write_report:
        build_report(study)
        say(f"report: {study.report}")
    return study


ENGINES = ("local", "ray")
"""Where a study runs: this process, or a Ray cluster."""


def _run_on_ray(config: StudyConfig, out: Path, loaded: dict[str, Any], on_mismatch: str, write_report: bool,
                say: Callable[[str], None], address: str | None, options: Any) -> Study:
    from dataclasses import replace

    from stages_of_inference.study.distributed import RayOptions, run_on_ray

    if loaded:
        raise ValueError("a study on Ray loads its models by name inside the workers; give names (or folders), "
                         f"not loaded models ({', '.join(loaded)})")
    if options is None:
        options = RayOptions()
    if not isinstance(options, RayOptions):
        raise TypeError(f"ray_options must be a RayOptions, got {type(options).__name__}")
    if address is not None:
        options = replace(options, address=address)
    started = time.perf_counter()
    with _study_folder(out, say):
        study = run_on_ray(config, out, options, on_mismatch=on_mismatch, write_report=False, say=say)
    say(f"all analyses done in {time.perf_counter() - started:.0f} s")
    if write_report:
        build_report(study)
        say(f"report: {study.report}")
    return study


@contextlib.contextmanager
def _study_folder(out: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Hold the study folder for one run: a second run into it is refused with one line; the
    temporaries a killed run left are removed; a folder this run made and left empty is removed.
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with file_lock(out / LOCK_FILE, what=f"the study folder {out}"):
            for folder in (out, *(p for p in out.iterdir() if p.is_dir())):
                for tmp in remove_stale_temporaries(folder):
                    say(f"removed {tmp}, left half-written by an interrupted run")
            yield
    finally:
        if created and {p.name for p in out.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(out, ignore_errors=True)


def _run_models(study: Study, loaded: dict[str, Any], on_mismatch: str, progress: bool,
                say: Callable[[str], None]) -> None:
    """Every analysis of every model of the study, one model loaded at a time."""
    import stages_of_inference as soi

    config, out = study.config, study.out_dir
    slugs = study_slugs(config)
    for name in config.models:
        t0 = time.perf_counter()
        model = loaded[name] if name in loaded else soi.load_model(name, device=config.device, backend=config.backend)
        on_bridge = backend_of(model) == "bridge"
        batches = study_batches(model, config)
        tokens = batches["main"]
        say(f"{name}: {model.cfg.n_layers} blocks, {tokens.shape[0]} x {tokens.shape[1]} tokens of {config.corpus!r} "
            f"(loaded in {time.perf_counter() - t0:.0f} s)")
        model_id = model_identity(name, model)
        study.results[name], study.timings[name] = {}, {}
        subject = _Subject(name, model, out / slugs[name], batches, model_id)
        for analysis in config.analyses:
            if on_bridge and not REGISTRY[analysis].bridge:
                study.left_out.append((name, analysis))
                say(f"  {analysis}: left out (registered as needing TransformerLens' HookedTransformer)")
                continue
            _run_one(study, REGISTRY[analysis], subject, on_mismatch, progress, say)
        study.stages[name] = _stages_for(study.results[name], name, model.cfg.n_layers)
        del model, tokens, batches


def study_batches(model: Any, config: StudyConfig) -> dict[str, TokenBatch]:
    """A model's token batches in the study: ``"main"`` (``config.n_sequences`` of the corpus,
    drawn by the seed) and ``"heavy"``, its first ``config.heavy_sequences``.
    """
    tokens = load_token_batch(model, config.corpus, n_sequences=config.n_sequences, seq_len=config.seq_len,
                              seed=config.seed)
    return {"main": tokens, "heavy": tokens[: config.heavy_sequences]}


def model_identity(name: str, model: Any) -> dict[str, Any]:
    """What a study fingerprint records of a model: the name it has in the study, its config
    and weights hashes.
    """
    return {"model": str(name), "model_config_hash": config_hash(model), "model_weights_hash": weights_hash(model)}


def _unique(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "_"
    return name


def study_slugs(config: StudyConfig) -> dict[str, str]:
    """Each model's folder name in the study folder (two names with one slug get ``_`` suffixes).

    Example:
        >>> study_slugs(StudyConfig(models=("a/m", "b/m")))
        {'a/m': 'm', 'b/m': 'm_'}
    """
    slugs: dict[str, str] = {}
    for name in config.models:
        slugs[name] = _unique(slug(name), set(slugs.values()))
    return slugs


@dataclass(frozen=True)
class _Subject:
    """One model of a study: its name, the model, its folder, its token batches, its identity."""

    name: str
    model: Any
    folder: Path
    batches: dict[str, TokenBatch]
    model_id: dict[str, Any]


def _run_one(study: Study, analysis: Analysis, subject: _Subject, on_mismatch: str, progress: bool,
             say: Callable[[str], None]) -> None:
    """Run (or reuse) one analysis of one model and save its result with explicit provenance."""
    name, model, batches = subject.name, subject.model, subject.batches
    config, done = study.config, study.results[name]
    where = subject.folder / analysis.name
    print_fp = fingerprint(analysis, config, subject.model_id, batches)
    found = _load_if_matching(where, print_fp, on_mismatch, say)
    if found is not None:
        done[analysis.name] = found
        study.reused.append((name, analysis.name))
        study.timings[name][analysis.name] = 0.0
        say(f"  {analysis.name}: reused the finished result in {where}")
        return
    t0 = time.perf_counter()
    work = subject.folder / f".{analysis.name}.work"
    ctx = Context(model, batches["main"], batches["heavy"], config, progress, work, done)
    batch_record = None if analysis.tokens == "none" else batches[analysis.tokens].describe()
    result = finished_result(analysis, [analysis.compute(ctx)], config, done, print_fp, batch_record,
                             time.perf_counter() - t0)
    result.save(where, fmt=config.table_format)
    shutil.rmtree(work, ignore_errors=True)
    done[analysis.name] = result
    study.timings[name][analysis.name] = time.perf_counter() - t0
    say(f"  {analysis.name}: {study.timings[name][analysis.name]:.0f} s")


def _stages_for(done: dict[str, Result], name: str, n_layers: int) -> pd.DataFrame:

    def table(analysis: str, key: str) -> pd.DataFrame | None:
        return done[analysis].tables.get(key) if analysis in done else None

    lens = table("logit_lens", "lens")
    if lens is not None:
        lens = lens[lens["convention"] == "paper"]
    sweep = table("robustness", "summary")
    inputs = dict(sweep=sweep, lens=lens, neurons=table("neurons", "counts"),
                  attention=table("previous_token_attention", "attention"))
    if all(v is None for v in inputs.values()):
        return pd.DataFrame()
    stages = place_stages(**inputs, n_layers=n_layers)
    stages["model"] = name
    return stages


def load_study(out_dir: str | Path) -> Study:
    """Read a finished study back from its folder (its ``study.json`` and result folders).

    Example:
        >>> load_study("reports/smollm2-135m").config.models  # doctest: +SKIP
        ('smollm2-135m',)
    """
    out = Path(out_dir)
    meta = out / STUDY_FILE
    if not meta.exists():
        raise FileNotFoundError(f"{out} holds no study (no study.json)")
    config = StudyConfig.from_json(meta.read_text())
    study = Study(config=config, out_dir=out)
    for name in config.models:
        folder = out / slug(name)
        done = {a: Result.load(folder / a) for a in config.analyses if (folder / a / PROVENANCE_FILE).exists()}
        study.results[name] = done
        n_layers = next((int(r.provenance.get("model", {}).get("n_layers", 0)) for r in done.values()
                         if r.provenance.get("model")), 0)
        if done and n_layers:
            study.stages[name] = _stages_for(done, name, n_layers)
        on_bridge = any(r.provenance.get("model", {}).get("backend") == "bridge" for r in done.values())
        study.left_out += [(name, a) for a in config.analyses
                           if on_bridge and a not in done and a in REGISTRY and not REGISTRY[a].bridge]
    return study
