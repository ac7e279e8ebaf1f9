"""The whole study in one call: every analysis for one or more models, and a self-contained report.

:func:`run_study` loads each model and one token batch of the corpus, runs every analysis of the
four stages (the robustness sweep, previous-token attention, subjoiner heads, the logit lens in
both conventions, layer similarity, probes, prediction / suppression neurons, the sharpening
profile with final-block deletions, and layer repetition), places the stages
(:func:`stages_of_inference.plots.place_stages`) and writes ``out_dir``::

    out_dir/
      study.json                   the StudyConfig of the run (drives `stages-of-inference run`)
      report.html                  figures (plotly, embedded once), readings, provenance, settings
      figures/<name>.png           static figures, only where a static exporter (kaleido) works
      <model>/<analysis>/          one folder per analysis: <table>.parquet (or .csv), its
                                   <table>.parquet.json provenance, and provenance.json

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

import dataclasses
import hashlib
import html
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from transformer_lens import HookedTransformer

from stages_of_inference._utils import atomic_write_json, atomic_write_text
from stages_of_inference.results import Result

ANALYSES = (
    "robustness",
    "previous_token_attention",
    "subjoiner_heads",
    "logit_lens",
    "layer_similarity",
    "probes",
    "neurons",
    "sharpening",
    "repetition",
)
"""Every analysis :func:`run_study` knows, in the order it runs them."""

FAST_ANALYSES = ("previous_token_attention", "layer_similarity", "neurons", "robustness")
"""A cheap subset (one forward pass each, or the weights only, plus the sweep) for quick checks."""

DEFAULT_OUT_DIR = "reports"

SUBJOINER_CHARS = 200_000
"""The subjoiner prompts are drawn from the first this many characters of each document."""


@dataclass(frozen=True)
class StudyConfig:
    """The settings of a study: saved as ``study.json`` and beside every result, and what the
    ``stages-of-inference run`` options fill in.

    Attributes:
        models: model names (embedded keys, TransformerLens names, folders or ``.gguf`` files);
            any sequence of names, kept as a tuple (as are ``analyses`` and ``static_formats``).
        corpus: a bundled corpus name, a text file or a folder.
        n_tokens: tokens in the main batch (``n_tokens // seq_len`` sequences, BOS included).
        seq_len: tokens per sequence, BOS first.
        seed: which text windows are drawn, and the prompts of the subjoiner analysis.
        analyses: the analyses to run (:data:`ANALYSES`).
        heavy_fraction: the share of the sequences used by the lens, sharpening and repetition
            analyses (each unembeds every layer or runs one plan per block).
        k: previous tokens of the attention analysis (the paper: 5).
        probe_label: the per-token label of the probes (``"continues_word"`` or ``"next_starts_word"``).
        subjoiner_prompts: most prompts of each kind in the subjoiner analysis.
        kurtosis_threshold: the prediction / suppression neuron threshold (the paper: 10).
        batch_size: sequences per forward pass.
        table_format: ``"parquet"`` or ``"csv"``.
        static_formats: static figure formats written when an exporter works (``"png"``, ``"svg"``).
        device: ``None`` (the best available) or a torch device name.

    Example:
        >>> c = StudyConfig(n_tokens=512)
        >>> c.n_sequences, c.heavy_sequences, StudyConfig.from_json(c.to_json()) == c
        (4, 2, True)
    """

    models: Sequence[str] = ("smollm2-135m",)
    corpus: str = "default"
    n_tokens: int = 1024
    seq_len: int = 128
    seed: int = 0
    analyses: Sequence[str] = ANALYSES
    heavy_fraction: float = 0.5
    k: int = 5
    probe_label: str = "continues_word"
    subjoiner_prompts: int = 64
    kurtosis_threshold: float = 10.0
    batch_size: int = 8
    table_format: str = "parquet"
    static_formats: Sequence[str] = ("png",)
    device: str | None = None

    def __post_init__(self) -> None:
        for name in ("models", "analyses", "static_formats"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            else:
                object.__setattr__(self, name, tuple(value))
        if not self.models:
            raise ValueError("models is empty: name at least one model (e.g. 'smollm2-135m')")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"a model is listed twice: {list(self.models)}")
        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown or not self.analyses:
            raise ValueError(f"unknown analyses {unknown or '(none given)'}; known: {', '.join(ANALYSES)}")
        if not isinstance(self.seq_len, int) or self.seq_len < 8:
            raise ValueError(f"seq_len must be an integer of at least 8 tokens, got {self.seq_len!r}")
        if not isinstance(self.n_tokens, int) or self.n_tokens < 2 * self.seq_len:
            raise ValueError(
                f"n_tokens must be at least two sequences of seq_len {self.seq_len} ({2 * self.seq_len} tokens), "
                f"got {self.n_tokens!r}"
            )
        if not 0 < self.heavy_fraction <= 1:
            raise ValueError(f"heavy_fraction must lie in (0, 1], got {self.heavy_fraction}")
        if self.k < 1:
            raise ValueError(f"k must be a positive number of previous tokens, got {self.k}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of sequences, got {self.batch_size}")
        if self.subjoiner_prompts < 16:
            raise ValueError(f"subjoiner_prompts must be at least 16, got {self.subjoiner_prompts}")
        if self.table_format not in ("parquet", "csv"):
            raise ValueError(f"table_format must be 'parquet' or 'csv', got {self.table_format!r}")
        bad = [f for f in self.static_formats if f not in ("png", "svg")]
        if bad:
            raise ValueError(f"unknown static figure formats {bad}; allowed: 'png', 'svg'")
        if self.probe_label not in ("continues_word", "next_starts_word"):
            raise ValueError(f"probe_label must be 'continues_word' or 'next_starts_word', got {self.probe_label!r}")

    @property
    def n_sequences(self) -> int:
        """Sequences in the main batch."""
        return self.n_tokens // self.seq_len

    @property
    def heavy_sequences(self) -> int:
        """Sequences used by the lens, sharpening and repetition analyses (at least 2)."""
        return max(2, int(round(self.n_sequences * self.heavy_fraction)))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the settings."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        """The settings as JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StudyConfig":
        """Read settings written by :meth:`to_json` (unknown keys are refused)."""
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown study settings {unknown}; known: {sorted(names)}")
        return cls(**data)


@dataclass
class Study:
    """What :func:`run_study` made: results per model and analysis, stage placements, the report.

    Attributes:
        config: the study's settings.
        out_dir: where everything was written.
        results: model name -> analysis -> :class:`~stages_of_inference.results.Result`.
        stages: model name -> stage table (:func:`stages_of_inference.plots.place_stages`).
        timings: model name -> analysis -> seconds spent (0 where a finished result was reused).
        reused: ``(model, analysis)`` pairs read back from ``out_dir``.
        figures: figure name -> plotly figure.
        readings: figure name -> the written reading of it.
    """

    config: StudyConfig
    out_dir: Path
    results: dict[str, dict[str, Result]] = field(default_factory=dict)
    stages: dict[str, pd.DataFrame] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    reused: list[tuple[str, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict, repr=False)
    readings: dict[str, str] = field(default_factory=dict, repr=False)
    static_note: str = ""

    @property
    def report(self) -> Path:
        """The report's path."""
        return self.out_dir / "report.html"


class StudyMismatchError(ValueError):
    """A finished analysis in ``out_dir`` was made with other settings, and ``on_mismatch="error"``."""


# --------------------------------------------------------------------------------------------
# the analyses


def _slug(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(str(name)).name or str(name))
    return keep.strip("._") or "model"


def _analysis_settings(config: StudyConfig, analysis: str) -> dict[str, Any]:
    """The settings that determine one analysis' numbers (beyond the model and tokens)."""
    common = {"batch_size": config.batch_size}
    heavy = {"sequences": config.heavy_sequences}
    return {
        "robustness": {"kinds": ["drop", "swap"], "per_token": True, **common},
        "previous_token_attention": {"k": config.k, **common},
        "subjoiner_heads": {"corpus": config.corpus, "max_prompts": config.subjoiner_prompts, "seed": config.seed,
                            "n_pieces": 4, "n_context_words": 16, "characters_per_document": SUBJOINER_CHARS},
        "logit_lens": {"conventions": ["paper", "per_layer_norm"], **heavy, **common},
        "layer_similarity": {"method": "cka", **common},
        "probes": {"label": config.probe_label, "seed": config.seed, **common},
        "neurons": {"kurtosis_threshold": config.kurtosis_threshold},
        "sharpening": {"convention": "per_layer_norm", "kurtosis_threshold": config.kurtosis_threshold,
                       "last_k": [1, 2, 3], **heavy, **common},
        "repetition": {"times": 2, "blocks": "each block alone", **heavy, **common},
    }[analysis]


def _repetition(model: Any, tokens: Any, batch_size: int, progress: bool) -> pd.DataFrame:
    """Every block run twice in place, one block at a time, as one prefix-sharing engine sweep."""
    from stages_of_inference._utils import relative_depth
    from stages_of_inference.interventions.executor import evaluate_plans
    from stages_of_inference.interventions.plan import LayerPlan
    from stages_of_inference.results import provenance, with_provenance

    n = model.cfg.n_layers
    plans = [LayerPlan.identity(n)] + [LayerPlan.repeat(n, [i], times=2) for i in range(n)]
    summary = evaluate_plans(model, tokens, plans, batch_size=batch_size, progress=progress)
    ref = summary.attrs["reference"]
    rows = summary.iloc[1:].reset_index(drop=True)
    df = pd.DataFrame({
        "layer": np.arange(n, dtype=np.int64),
        "relative_depth": [relative_depth(i, n) for i in range(n)],
        "entropy_bits": rows["entropy_bits"].to_numpy(),
        "entropy_change_bits": (rows["entropy_bits"] - ref["entropy_bits"]).to_numpy(),
        "confidence_change": (rows["confidence"] - ref["confidence"]).to_numpy(),
        "kl_nats": rows["kl_nats"].to_numpy(),
        "loss_delta": rows["loss_delta"].to_numpy(),
        "relative_accuracy": rows["relative_accuracy"].to_numpy(),
        "top1_agreement": rows["top1_agreement"].to_numpy(),
        "n_tokens": rows["n_tokens"].to_numpy(),
        "plan": rows["plan"].to_numpy(),
    })
    return with_provenance(df, provenance(model, tokens, analysis="layer_repetition", times=2,
                                          blocks="each block alone", reference=ref))


def _subjoiner_tables(result: Any) -> dict[str, pd.DataFrame]:
    from stages_of_inference.plots import _pattern_table

    patterns = _pattern_table(result)
    patterns.attrs = {}
    patterns["n_pieces"] = int(result.n_pieces)
    return {"heads": result.heads, "patterns": patterns}


def _compute(analysis: str, model: Any, tokens: Any, heavy: Any, config: StudyConfig, progress: bool,
             sweep_dir: Path, done: dict[str, Result]) -> dict[str, pd.DataFrame]:
    """Run one analysis; returns its named tables."""
    from stages_of_inference.stages import detokenization as detok
    from stages_of_inference.stages import feature_engineering as fe
    from stages_of_inference.stages import prediction_ensembling as pe
    from stages_of_inference.stages import residual_sharpening as rs

    bs = config.batch_size
    if analysis == "robustness":
        from stages_of_inference.robustness import robustness_sweep

        try:
            sweep = robustness_sweep(model, tokens, per_token=True, progress=progress, batch_size=bs, out_dir=sweep_dir)
        except ValueError as error:
            if "cannot be resumed" not in str(error) and "not empty" not in str(error):
                raise
            shutil.rmtree(sweep_dir, ignore_errors=True)
            sweep = robustness_sweep(model, tokens, per_token=True, progress=progress, batch_size=bs, out_dir=sweep_dir)
        return dict(sweep.tables)
    if analysis == "previous_token_attention":
        return {"attention": detok.previous_token_attention(model, tokens, k=config.k, batch_size=bs, progress=progress)}
    if analysis == "subjoiner_heads":
        from stages_of_inference.data import corpus_texts

        texts = corpus_texts(config.corpus) if _is_bundled(config.corpus) else _file_texts(config.corpus)
        # prompts come from the start of each document: scanning all of a long corpus costs more
        # than the forward passes, and a few hundred thousand words hold plenty of candidates
        texts = [t[:SUBJOINER_CHARS] for t in texts]
        result = detok.subjoiner_heads(model, texts, max_prompts=config.subjoiner_prompts, seed=config.seed,
                                       progress=progress)
        return _subjoiner_tables(result)
    if analysis == "logit_lens":
        tables = [fe.logit_lens(model, heavy, convention=c, batch_size=bs, progress=progress)
                  for c in ("paper", "per_layer_norm")]
        lens = pd.concat(tables, ignore_index=True)
        lens.attrs["provenance"] = tables[0].attrs["provenance"]
        return {"lens": lens}
    if analysis == "layer_similarity":
        return {"similarity": fe.layer_similarity(model, tokens, method="cka", batch_size=bs, progress=progress)}
    if analysis == "probes":
        return {"probes": fe.probe_layers(model, tokens, config.probe_label, seed=config.seed, batch_size=bs,
                                          progress=progress)}
    if analysis == "neurons":
        moments = pe.neuron_moments(model, config.kurtosis_threshold, progress=progress)
        counts = pe.neuron_counts(moments, n_layers=model.cfg.n_layers)
        return {"counts": counts, "moments": moments}
    if analysis == "sharpening":
        moments = done["neurons"]["moments"] if "neurons" in done else True
        lens = done["logit_lens"]["lens"] if "logit_lens" in done else None  # same heavy tokens: read, not redone
        profile = rs.sharpening_profile(model, heavy, moments=moments, kurtosis_threshold=config.kurtosis_threshold,
                                        lens=lens, batch_size=bs, progress=progress)
        ablation = rs.final_block_ablation(model, heavy, last_k=(1, 2, 3), batch_size=bs, progress=progress)
        return {"profile": profile, "final_blocks": ablation}
    if analysis == "repetition":
        return {"repetition": _repetition(model, heavy, bs, progress)}
    raise ValueError(f"unknown analysis {analysis!r}; known: {', '.join(ANALYSES)}")  # pragma: no cover


def _is_bundled(corpus: str) -> bool:
    from stages_of_inference.data import corpus_names

    return corpus in corpus_names()


def _file_texts(corpus: str) -> list[str]:
    path = Path(corpus)
    if path.is_dir():
        return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(path.glob("*.txt"))]
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")]
    raise FileNotFoundError(f"corpus {corpus!r} is neither a bundled corpus nor a text file or folder")


# --------------------------------------------------------------------------------------------
# the study


def _tokens_digest(tokens: Any) -> str:
    import torch

    return hashlib.sha256(tokens.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:24]


def _fingerprint(analysis: str, config: StudyConfig, model_id: dict[str, Any], tokens: Any, heavy: Any) -> dict[str, Any]:
    uses_heavy = analysis in ("logit_lens", "sharpening", "repetition")
    data: dict[str, Any] = {"corpus": config.corpus}
    if analysis not in ("neurons", "subjoiner_heads"):
        data["tokens_sha256"] = _tokens_digest(heavy if uses_heavy else tokens)
        data["tokens_shape"] = list((heavy if uses_heavy else tokens).shape)
    if analysis == "sharpening":
        data["moments_threshold"] = config.kurtosis_threshold
    return {"analysis": analysis, **model_id, **data, "settings": _analysis_settings(config, analysis)}


def _load_if_matching(folder: Path, fingerprint: dict[str, Any], on_mismatch: str) -> Result | None:
    if not (folder / "provenance.json").exists():
        return None
    try:
        found = json.loads((folder / "provenance.json").read_text()).get("study_fingerprint")
    except (OSError, json.JSONDecodeError):
        found = None
    if found == fingerprint:
        return Result.load(folder)
    if on_mismatch == "error":
        diffs = [k for k in sorted(set(fingerprint) | set(found or {})) if (found or {}).get(k) != fingerprint.get(k)]
        raise StudyMismatchError(
            f"{folder} holds a finished analysis made with other settings (differs in: {', '.join(diffs) or 'all'}); "
            "use another out_dir, or on_mismatch='recompute' to replace it"
        )
    return None


def run_study(
    models: str | HookedTransformer | Sequence[str | HookedTransformer] = ("smollm2-135m",),
    corpus: str = "default",
    n_tokens: int = 1024,
    out_dir: str | Path = DEFAULT_OUT_DIR,
    *,
    analyses: Sequence[str] = ANALYSES,
    config: StudyConfig | None = None,
    on_mismatch: str = "recompute",
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    write_report: bool = True,
) -> Study:
    """Run every analysis of the four stages on each model and write a self-contained report.

    Args:
        models: one model or several: names (embedded keys such as ``"smollm2-135m"`` and
            ``"gemma3-270m"``, TransformerLens names where the hub is reachable, folders, ``.gguf``
            files) or already loaded ``HookedTransformer`` objects (with a tokenizer), which are
            known in the study by their name (``load_model`` records it).
        corpus: a bundled corpus name (``"default"``, ``"austen"``, ``"melville"``), a text file or a
            folder of ``.txt`` files.
        n_tokens: tokens in the main batch (sequences of 128, BOS first); the expensive analyses use
            half of it (module docstring).
        out_dir: the study's folder (created; reused on a rerun).
        analyses: which analyses to run (:data:`ANALYSES`).
        config: full settings; when given, ``corpus``, ``n_tokens`` and ``analyses`` are ignored,
            and the models are ``config.models`` (loaded models passed in ``models`` are used for
            the names they carry).
        on_mismatch: ``"recompute"`` a finished analysis made with other settings, or ``"error"``.
        progress: progress bars.
        log: where one line per step goes (``None``: silent).
        write_report: write ``report.html`` (and static figures) at the end.

    Returns:
        A :class:`Study`; the report is at ``study.report``.

    Example:
        >>> study = run_study("smollm2-135m", n_tokens=512, out_dir="/tmp/soi-study",
        ...                   analyses=("robustness",), progress=False)  # doctest: +SKIP
        >>> study.report.name  # doctest: +SKIP
        'report.html'
    """
    import stages_of_inference as soi
    from stages_of_inference.results import config_hash
    from stages_of_inference.robustness import weights_hash

    from stages_of_inference.results import model_name

    given = [models] if isinstance(models, (str, HookedTransformer)) else list(models)
    loaded = {model_name(m): m for m in given if isinstance(m, HookedTransformer)}
    if config is None:
        config = StudyConfig(models=tuple(m if isinstance(m, str) else model_name(m) for m in given), corpus=corpus,
                             n_tokens=n_tokens, analyses=tuple(analyses))

    if on_mismatch not in ("recompute", "error"):
        raise ValueError(f"on_mismatch must be 'recompute' or 'error', got {on_mismatch!r}")
    say = log or (lambda _: None)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "study.json", config.to_dict())
    study = Study(config=config, out_dir=out)
    slugs: dict[str, str] = {}
    started = time.perf_counter()

    for name in config.models:
        slug = _slug(name)
        while slug in slugs.values():
            slug += "_"
        slugs[name] = slug
        t0 = time.perf_counter()
        model = loaded[name] if name in loaded else soi.load_model(name, device=config.device)
        tokens = soi.load_tokens(model, config.corpus, n_sequences=config.n_sequences, seq_len=config.seq_len,
                                 seed=config.seed)
        heavy = tokens[: config.heavy_sequences]
        model_id = {"model": str(name), "model_config_hash": config_hash(model),
                    "model_weights_hash": weights_hash(model)}
        say(f"{name}: {model.cfg.n_layers} blocks, {tokens.shape[0]} x {tokens.shape[1]} tokens of {config.corpus!r} "
            f"(loaded in {time.perf_counter() - t0:.0f} s)")
        done: dict[str, Result] = {}
        study.timings[name] = {}
        for analysis in config.analyses:
            folder = out / slug / analysis
            fingerprint = _fingerprint(analysis, config, model_id, tokens, heavy)
            found = _load_if_matching(folder, fingerprint, on_mismatch)
            if found is not None:
                done[analysis] = found
                study.reused.append((name, analysis))
                study.timings[name][analysis] = 0.0
                say(f"  {analysis}: reused the finished result in {folder}")
                continue
            t0 = time.perf_counter()
            sweep_dir = out / slug / ".robustness_checkpoint"
            tables = _compute(analysis, model, tokens, heavy, config, progress, sweep_dir, done)
            record = dict(next(iter(tables.values())).attrs.get("provenance", {}))
            record["study_fingerprint"] = fingerprint
            record["study"] = config.to_dict()
            record["study_seconds"] = round(time.perf_counter() - t0, 1)
            result = Result({k: v.copy() for k, v in tables.items()}, record)
            result.save(folder, fmt=config.table_format)
            if analysis == "robustness":
                shutil.rmtree(sweep_dir, ignore_errors=True)
            done[analysis] = result
            study.timings[name][analysis] = time.perf_counter() - t0
            say(f"  {analysis}: {study.timings[name][analysis]:.0f} s")
        study.results[name] = done
        study.stages[name] = _stages_for(done, name, model.cfg.n_layers)
        del model, tokens, heavy
    say(f"all analyses done in {time.perf_counter() - started:.0f} s")
    if write_report:
        build_report(study)
        say(f"report: {study.report}")
    return study


def _stages_for(done: dict[str, Result], name: str, n_layers: int) -> pd.DataFrame:
    from stages_of_inference.plots import place_stages

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
    meta = out / "study.json"
    if not meta.exists():
        raise FileNotFoundError(f"{out} holds no study (no study.json)")
    config = StudyConfig.from_json(meta.read_text())
    study = Study(config=config, out_dir=out)
    for name in config.models:
        folder = out / _slug(name)
        done = {a: Result.load(folder / a) for a in config.analyses if (folder / a / "provenance.json").exists()}
        study.results[name] = done
        n_layers = next((int(r.provenance.get("model", {}).get("n_layers", 0)) for r in done.values()
                         if r.provenance.get("model")), 0)
        if done and n_layers:
            study.stages[name] = _stages_for(done, name, n_layers)
    return study


# --------------------------------------------------------------------------------------------
# the report


def _tables(study: Study, analysis: str, key: str) -> list[pd.DataFrame]:
    out = []
    for name, done in study.results.items():
        if analysis in done and key in done[analysis].tables:
            df = done[analysis].tables[key]
            prov = dict(df.attrs.get("provenance", {}))
            prov.setdefault("model", {})
            prov["model"] = dict(prov["model"], name=name)
            df.attrs["provenance"] = prov
            out.append(df)
    return out


def _stage_arg(study: Study) -> list[pd.DataFrame] | None:
    tables = [t for t in study.stages.values() if t is not None and not t.empty]
    return tables or None


def _fmt(x: float, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _read_robustness(study: Study) -> str:
    parts = []
    for name, done in study.results.items():
        if "robustness" not in done:
            continue
        s = done["robustness"]["summary"]
        base = s[s["kind"] == "none"].iloc[0]
        drops, swaps = s[s["kind"] == "drop"], s[s["kind"] == "swap"]
        worst = drops.loc[drops["kl_nats"].idxmax()]
        n = len(drops)
        mid = drops[(drops["relative_depth"] >= 1 / 3) & (drops["relative_depth"] < 2 / 3)]
        last = drops.iloc[-1]
        text = (f"<b>{html.escape(name)}</b>: the unmodified model has loss {_fmt(base['loss'])} nats and top-1 accuracy "
                f"{_fmt(100 * base['accuracy'], 1)} %. Deleting block {int(worst['layer'])} (relative depth "
                f"{_fmt(worst['relative_depth'])}) does the most damage: KL {_fmt(worst['kl_nats'])} nats, "
                f"{_fmt(100 * worst['relative_accuracy'], 0)} % of the accuracy retained. ")
        if len(mid):
            text += (f"Deleting one of the middle third's {len(mid)} blocks costs on average KL {_fmt(mid['kl_nats'].mean())} "
                     f"nats and keeps {_fmt(100 * mid['relative_accuracy'].mean(), 0)} % of the accuracy; ")
        text += (f"the last block (block {n - 1}) costs KL {_fmt(last['kl_nats'])} nats "
                 f"({_fmt(100 * last['relative_accuracy'], 0)} % retained). ")
        text += (f"Over all blocks, a deletion keeps {_fmt(100 * drops['relative_accuracy'].min(), 0)}–"
                 f"{_fmt(100 * drops['relative_accuracy'].max(), 0)} % of the accuracy (the paper: 72–95 % on its models, "
                 "its first block excepted). ")
        if len(swaps):
            rel = "less" if swaps["kl_nats"].mean() < drops["kl_nats"].mean() else "more"
            text += (f"Swapping adjacent blocks hurts {rel} than deleting on average (mean KL {_fmt(swaps['kl_nats'].mean())} "
                     f"vs {_fmt(drops['kl_nats'].mean())} nats).")
        parts.append(text)
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def _read_attention(study: Study) -> str:
    parts = []
    for df in _tables(study, "previous_token_attention", "attention"):
        name = df.attrs["provenance"]["model"]["name"]
        from stages_of_inference.plots import _first_peak

        df = df.sort_values("layer")
        peak = df.loc[df["mean_attention"].idxmax()]
        first = _first_peak(df["layer"].to_numpy(int), df["mean_attention"].to_numpy(float))
        first_row = df[df["layer"] == first].iloc[0]
        late = df[df["relative_depth"] >= 2 / 3]["mean_attention"].mean()
        parts.append(f"<b>{html.escape(name)}</b>: the mean attention weight on each of the previous {int(df['k'].iloc[0])} "
                     f"tokens has its first peak at block {first} (relative depth {_fmt(first_row['relative_depth'])}, "
                     f"{_fmt(first_row['mean_attention'], 3)}) and its highest value at block {int(peak['layer'])} "
                     f"(relative depth {_fmt(peak['relative_depth'])}, {_fmt(peak['mean_attention'], 3)}); it averages "
                     f"{_fmt(late, 3)} over the last third (the paper, GPT-2 small: about 0.10 at depth 0.18, 0.02–0.03 "
                     "late).")
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def _read_subjoiner(study: Study) -> str:
    parts = []
    for df in _tables(study, "subjoiner_heads", "heads"):
        name = df.attrs["provenance"]["model"]["name"]
        top = df.sort_values("difference", ascending=False).iloc[0]
        strong = int((df["z"] > 3).sum()) if "z" in df else 0
        parts.append(f"<b>{html.escape(name)}</b>: the best subjoiner head is L{int(top['layer'])}H{int(top['head'])} "
                     f"(relative depth {_fmt(top['relative_depth'])}): from a four-piece word's last piece it puts "
                     f"{_fmt(top['score'], 3)} of its attention on the word's earlier pieces, against "
                     f"{_fmt(top['control_score'], 3)} on the same positions in control prompts. {strong} heads beat "
                     f"their control by more than three standard errors ({int(top.get('n_prompts', 0))} prompts of each kind).")
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def _read_patterns(name: str, patterns: pd.DataFrame) -> str:
    heads = patterns.attrs.get("heads")
    n_pieces = int(patterns.attrs.get("n_pieces", 4))
    if heads is None or heads.empty:
        return ""
    top = heads.sort_values("difference", ascending=False).iloc[0]
    return (f"<p><b>{html.escape(name)}</b>: mean attention over the prompts, rows the attending (query) position and "
            f"columns the attended (key) position, both counted from the prompt's end; the final word's {n_pieces} "
            f"pieces are the last {n_pieces} positions. A subjoiner head such as L{int(top['layer'])}H{int(top['head'])} "
            "attends from each piece of a split word to the piece before it inside the word, and does not in the "
            "controls, whose last positions belong to different words.</p>")


def _read_lens(study: Study) -> str:
    parts = []
    for df in _tables(study, "logit_lens", "lens"):
        name = df.attrs["provenance"]["model"]["name"]
        pieces = []
        for convention, label in (("paper", "paper convention"), ("per_layer_norm", "per-layer norm")):
            part = df[df["convention"] == convention].sort_values("layer")
            if part.empty:
                continue
            h = part["entropy_bits"].to_numpy()
            half = part.iloc[len(part) // 2]
            pieces.append(f"with the {label}, entropy is {_fmt(h[0], 1)} bits at the embeddings, "
                          f"{_fmt(half['entropy_bits'], 1)} at half depth and {_fmt(h[-1], 1)} at the output; "
                          f"KL to the output at half depth is {_fmt(half['kl_to_final_nats'], 1)} nats")
        parts.append(f"<b>{html.escape(name)}</b>: " + "; ".join(pieces) + ".")
    return ("<p>" + "</p><p>".join(parts) + "</p><p>The two conventions tell different stories (docs: the logit "
            "lens): dividing every layer by the final norm's scale keeps early layers near-uniform, while "
            "normalising each by its own statistics makes them look sharp.</p>") if parts else ""


def _read_similarity(study: Study) -> str:
    parts = []
    for df in _tables(study, "layer_similarity", "similarity"):
        name = df.attrs["provenance"]["model"]["name"]
        grid = df.pivot(index="layer_a", columns="layer_b", values="similarity").to_numpy()
        n = grid.shape[0]
        neighbours = np.array([grid[i, i + 1] for i in range(n - 1)])
        third = max(1, n // 3)
        parts.append(f"<b>{html.escape(name)}</b>: neighbouring blocks' outputs have CKA {_fmt(neighbours[third:n - third].mean())} "
                     f"on average in the middle third, {_fmt(neighbours[:third].mean())} in the first third and "
                     f"{_fmt(neighbours[n - third - 1:].mean())} in the last; block 0 and the last block have CKA "
                     f"{_fmt(grid[0, -1])}.")
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def _read_probes(study: Study) -> str:
    parts = []
    for df in _tables(study, "probes", "probes"):
        name = df.attrs["provenance"]["model"]["name"]
        best = df.loc[df["accuracy"].idxmax()]
        parts.append(f"<b>{html.escape(name)}</b>: a linear probe for “{html.escape(str(best['label']))}” reaches "
                     f"{_fmt(100 * best['accuracy'], 1)} % held-out accuracy at readout {int(best['layer'])} (relative depth "
                     f"{_fmt(best['relative_depth'])}), against {_fmt(100 * best['baseline'], 1)} % for the majority class; "
                     f"{_fmt(100 * df['accuracy'].iloc[0], 1)} % on the embeddings.")
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def _read_neurons(study: Study) -> str:
    parts = []
    for df in _tables(study, "neurons", "counts"):
        name = df.attrs["provenance"]["model"]["name"]
        total_p, total_s = int(df["n_prediction"].sum()), int(df["n_suppression"].sum())
        if total_p + total_s == 0:
            moments = study.results.get(name, {}).get("neurons")
            moments = moments.tables.get("moments") if moments is not None else None
            text = f"<b>{html.escape(name)}</b>: no neuron passes the kurtosis threshold"
            if moments is not None and len(moments):
                top = moments.loc[moments["vocab_kurt"].idxmax()]
                text += (f"; the highest vocabulary kurtosis is {_fmt(float(top['vocab_kurt']), 1)} (block {int(top['layer'])}, "
                         f"neuron {int(top['neuron'])}, skew {_fmt(float(top['vocab_skew']))})")
            parts.append(text + ".")
            continue
        cum = df["n_prediction"].cumsum() / max(total_p, 1)
        first_half = int(df[df["relative_depth"] < 0.5]["n_prediction"].sum()) if total_p else 0
        peak_p = df.loc[df["n_prediction"].idxmax()]
        peak_s = df.loc[df["n_suppression"].idxmax()]
        parts.append(f"<b>{html.escape(name)}</b>: {total_p} prediction and {total_s} suppression neurons; "
                     f"{first_half} of the prediction neurons lie in the first half of the depth "
                     f"(half of them by block {int(df['layer'][cum >= 0.5].iloc[0]) if total_p else 'n/a'}). "
                     f"Prediction neurons peak at block {int(peak_p['layer'])} ({int(peak_p['n_prediction'])}), "
                     f"suppression neurons at block {int(peak_s['layer'])} ({int(peak_s['n_suppression'])}).")
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def _read_sharpening(study: Study) -> str:
    parts = []
    for name, done in study.results.items():
        if "sharpening" not in done:
            continue
        prof = done["sharpening"]["profile"]
        last = prof.iloc[-1]
        sharpest = prof.loc[prof["entropy_change_bits"].idxmin()]
        text = (f"<b>{html.escape(name)}</b>: the last block changes the output entropy by "
                f"{_fmt(last['entropy_change_bits'])} bits ({'sharpens' if last['entropy_change_bits'] < 0 else 'flattens: it calibrates rather than sharpens'}) "
                f"and top-1 confidence by {_fmt(last['confidence_change'], 3)}; block {int(sharpest['layer'])} sharpens most "
                f"({_fmt(sharpest['entropy_change_bits'])} bits). ")
        fb = done["sharpening"].tables.get("final_blocks")
        if fb is not None and len(fb) > 1:
            one = fb[(fb["kind"] == "last_k") & (fb["k"] == 1)]
            if len(one):
                r = one.iloc[0]
                text += (f"Deleting the last block moves the output entropy by {_fmt(r['entropy_change_bits'])} bits, the "
                         f"calibration error by {_fmt(r['ece_change'], 3)} and the loss by {_fmt(r['loss_delta'])} nats.")
        parts.append(text)
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def _read_repetition(study: Study) -> str:
    parts = []
    for df in _tables(study, "repetition", "repetition"):
        name = df.attrs["provenance"]["model"]["name"]
        worst = df.loc[df["kl_nats"].idxmax()]
        mid = df[(df["relative_depth"] >= 1 / 3) & (df["relative_depth"] < 2 / 3)]
        parts.append(f"<b>{html.escape(name)}</b>: running block {int(worst['layer'])} twice costs the most (KL "
                     f"{_fmt(worst['kl_nats'])} nats, entropy change {_fmt(worst['entropy_change_bits'])} bits); repeating a "
                     f"middle-third block costs KL {_fmt(mid['kl_nats'].mean())} nats on average and changes the output "
                     f"entropy by {_fmt(mid['entropy_change_bits'].mean())} bits.")
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def _read_stages(study: Study) -> str:
    parts = []
    for name, table in study.stages.items():
        if table is None or table.empty:
            continue
        spans = []
        for _, r in table.iterrows():
            if r["n_blocks"] > 0:
                blocks = f"block {r['first_layer']}" if r["n_blocks"] == 1 else f"blocks {r['first_layer']}–{r['last_layer']}"
                spans.append(f"{r['stage']}: {blocks} (depth {_fmt(r['start'])}–{_fmt(r['end'])}; {html.escape(str(r['evidence']))})")
            else:
                spans.append(f"{r['stage']}: no block")
        parts.append(f"<b>{html.escape(name)}</b>: " + "; ".join(spans) + ".")
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def _figures(study: Study) -> list[tuple[str, str, Any, str]]:
    """(name, title, figure, reading) for every figure the study's results allow."""
    from stages_of_inference import plots

    stages = _stage_arg(study)
    palette = {name: plots._PALETTE[i % len(plots._PALETTE)] for i, name in enumerate(study.results)}
    out: list[tuple[str, str, Any, str]] = []

    def add(name: str, title: str, make: Callable[[], Any], reading: Callable[[Study], str]) -> None:
        try:
            fig = make()
        except (ValueError, KeyError) as error:
            out.append((name, title, None, f"<p class='note'>Not drawn: {html.escape(str(error))}</p>"))
            return
        out.append((name, title, fig, reading(study)))

    sweeps = []
    for name, done in study.results.items():
        if "robustness" in done:
            result = done["robustness"]
            for df in result.tables.values():
                df.attrs["provenance"] = dict(df.attrs.get("provenance", {}), model={
                    **df.attrs.get("provenance", {}).get("model", {}), "name": name})
            sweeps.append(result)
    if sweeps:
        add("robustness", "Deleting and swapping blocks", lambda: plots.robustness(sweeps, stages=stages, colors=palette),
            _read_robustness)
    t = _tables(study, "previous_token_attention", "attention")
    if t:
        add("previous_token_attention", "Stage 1: attention to the previous tokens",
            lambda: plots.previous_token_attention(t, stages=stages, colors=palette), _read_attention)
    heads = _tables(study, "subjoiner_heads", "heads")
    if heads:
        add("subjoiner_scores", "Stage 1: subjoiner heads", lambda: plots.subjoiner_scores(heads, stages=stages, colors=palette),
            _read_subjoiner)
        for name, done in study.results.items():
            if "subjoiner_heads" in done:
                patterns = done["subjoiner_heads"]["patterns"].copy()
                patterns.attrs = {"heads": done["subjoiner_heads"]["heads"],
                                  "n_pieces": int(patterns["n_pieces"].iloc[0]) if "n_pieces" in patterns else 0}
                add(f"subjoiner_patterns_{_slug(name)}", f"Stage 1: subjoiner attention patterns ({name})",
                    lambda p=patterns: plots.subjoiner_patterns(p, top=3),
                    lambda s, n=name, p=patterns: _read_patterns(n, p))
    t = _tables(study, "logit_lens", "lens")
    if t:
        add("logit_lens", "Stage 2: the logit lens", lambda: plots.logit_lens(t, stages=stages, colors=palette), _read_lens)
    t = _tables(study, "layer_similarity", "similarity")
    if t:
        add("layer_similarity", "Stage 2: similarity of the blocks", lambda: plots.layer_similarity(t), _read_similarity)
    t = _tables(study, "probes", "probes")
    if t:
        add("probes", "Stage 2: probes", lambda: plots.probe_accuracy(t, stages=stages, colors=palette), _read_probes)
    t = _tables(study, "neurons", "counts")
    if t:
        add("neuron_counts", "Stage 3: prediction and suppression neurons",
            lambda: plots.neuron_counts(t, share=len(t) > 1, stages=stages, colors=palette), _read_neurons)
    t = _tables(study, "sharpening", "profile")
    if t:
        add("sharpening", "Stage 4: residual sharpening", lambda: plots.sharpening_profile(t, stages=stages, colors=palette),
            _read_sharpening)
    t = _tables(study, "repetition", "repetition")
    if t:
        add("repetition", "Stage 4: layer repetition", lambda: plots.layer_repetition(t, stages=stages, colors=palette),
            _read_repetition)
    return out


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.5}
h1{font-size:1.7em;margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.figure{margin:1em 0 2em} .reading{background:#f7f7f9;border-left:3px solid #4c78a8;padding:.4em 1em;margin:.5em 0}
.note{color:#a33} table{border-collapse:collapse;font-size:.9em;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
pre{background:#f7f7f9;padding:.6em;overflow-x:auto;font-size:.85em} .small{font-size:.85em;color:#555}
"""


def _provenance_table(study: Study) -> str:
    rows = []
    versions: dict[str, set[str]] = {}
    for name, done in study.results.items():
        for analysis, result in done.items():
            p = result.provenance
            m = p.get("model", {})
            tok = p.get("tokens", {})
            for k, val in p.get("versions", {}).items():
                versions.setdefault(k, set()).add(str(val))
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in (
                name, analysis, m.get("n_layers", ""), m.get("config_hash", ""),
                f"{tok.get('n_sequences', '')} × {tok.get('seq_len', '')}" if tok else "weights only / prompts",
                tok.get("sha256", ""), p.get("created_utc", ""), _time_text(study, name, analysis, p),
            )) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("model", "analysis", "blocks", "config hash", "tokens", "tokens sha256",
                                             "created (UTC)", "time"))
    used = "; ".join(f"{k} {', '.join(sorted(v))}" for k, v in versions.items())
    return (f"<table><tr>{head}</tr>{''.join(rows)}</table>"
            f"<p class='small'>Versions: {html.escape(used)}.</p>")


def _time_text(study: Study, name: str, analysis: str, record: dict[str, Any]) -> str:
    seconds = record.get("study_seconds")
    text = "–" if seconds is None else f"{float(seconds):.0f} s"
    return f"{text} (reused)" if (name, analysis) in study.reused else text


def build_report(study: Study) -> Path:
    """Write ``report.html`` (and static figures where an exporter works) for a study's results.

    The HTML is self-contained: plotly.js is embedded once in the page head, each figure is a
    ``<div>`` drawn by it, no file or network is needed to read it.

    Example:
        >>> build_report(load_study("reports/smollm2-135m"))  # doctest: +SKIP
        PosixPath('reports/smollm2-135m/report.html')
    """
    import plotly
    from plotly.offline import get_plotlyjs

    from stages_of_inference import __version__

    figures = _figures(study)
    study.figures = {name: fig for name, _, fig, _ in figures if fig is not None}
    study.readings = {name: reading for name, _, _, reading in figures}
    sections = []
    for name, title, fig, reading in figures:
        body = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}",
                           config={"displaylogo": False, "responsive": True}) if fig is not None else ""
        sections.append(f"<section class='figure' id='{html.escape(name)}'><h2>{html.escape(title)}</h2>{body}"
                        f"<div class='reading'>{reading}</div></section>")
    study.static_note = _write_static(study)
    models = ", ".join(study.results)
    config = study.config
    stage_text = _read_stages(study)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Stages of inference: {html.escape(models)}</title>
<style>{_CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body>
<h1>Stages of inference: {html.escape(models)}</h1>
<p class="small">Written by stages_of_inference {__version__} (plotly {plotly.__version__}) on
{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. It reproduces the experiments of Lad, Lee, Gurnee &amp; Tegmark,
<i>The Remarkable Robustness of LLMs: Stages of Inference?</i> (arXiv:2406.19384). Corpus: {html.escape(config.corpus)};
{config.n_sequences} sequences of {config.seq_len} tokens (BOS first), the lens, sharpening and repetition analyses on the
first {config.heavy_sequences}. Metrics are taken on positions 1..T−2 of each sequence. Every x axis is relative depth,
so models of different depth line up.</p>
<h2>Where the data places the four stages</h2>
<p>Shaded bands in the figures (dotted boundaries, one colour per model, when several models are shown). The rule: a
block is <i>fragile</i> when deleting it costs more than 3 × the median deletion KL. Detokenization ends after the
leading fragile blocks and after the first peak of previous-token attention; prediction ensembling starts at the first
block after which the paper-convention logit-lens entropy has fallen by a quarter of its total fall; residual
sharpening is the trailing run of blocks that are fragile or hold more suppression than prediction neurons.</p>
<div class="reading">{stage_text or 'No stage placement: the study ran none of the analyses it needs.'}</div>
{''.join(sections)}
<h2>Provenance</h2>
{_provenance_table(study)}
<p class="small">Data files: one folder per model and analysis under this report's folder
(<code>&lt;model&gt;/&lt;analysis&gt;/&lt;table&gt;.{config.table_format}</code>, each with a JSON provenance file).
{html.escape(study.static_note)}</p>
<h2>Settings</h2>
<pre>{html.escape(config.to_json())}</pre>
<p class="small">Cite: Lad, V., Lee, J. H., Gurnee, W. &amp; Tegmark, M. (2024). The Remarkable Robustness of LLMs:
Stages of Inference? arXiv:2406.19384; and this library (CITATION.cff).</p>
</body></html>
"""
    atomic_write_text(study.report, page)
    return study.report


def _write_static(study: Study) -> str:
    """Static copies of the figures when kaleido (and a browser for it) works here; else a note."""
    if not study.config.static_formats:
        return "Static figures: not asked for."
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return "Static figures: not written (install kaleido for PNG/SVG copies)."
    from stages_of_inference._utils import atomic_path

    folder = study.out_dir / "figures"
    written = 0
    for name, fig in study.figures.items():
        for fmt in study.config.static_formats:
            try:
                with atomic_path(folder / f"{name}.{fmt}") as tmp:
                    fig.write_image(str(tmp), format=fmt, width=1200, height=int(fig.layout.height or 500), scale=1)
                written += 1
            except Exception as error:  # kaleido without a usable browser, and the like
                return f"Static figures: stopped after {written} ({type(error).__name__}: {str(error).splitlines()[0][:160]})."
    return f"Static figures: {written} files in figures/."
