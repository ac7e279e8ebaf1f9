"""The settings of a study (:class:`StudyConfig`), validated against the registry of analyses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages_of_inference._checks import BACKEND_CHOICES, check_count, check_device, check_precision
from stages_of_inference.data import check_corpus
from stages_of_inference.stages.task_damage import load_cloze_items
from stages_of_inference.study import analyses as _builtin  # noqa: F401 - registers the built-in analyses
from stages_of_inference.study.options import OPTIONS
from stages_of_inference.study.registry import REGISTRY, default_analyses, fast_analyses
from stages_of_inference.tuned_lens import DEFAULT_STEPS

__all__ = ["DEFAULT_OUT_DIR", "SELECTIONS", "StudyConfig", "check_inputs", "from_args", "select_analyses"]

DEFAULT_OUT_DIR = "reports"

SELECTIONS = {"all": default_analyses, "fast": fast_analyses}
"""Names that stand for a selection of analyses: ``all`` (every default one) and ``fast``."""


def select_analyses(names: Any) -> tuple[str, ...]:
    """The analyses ``names`` stands for: one name or a sequence of names of
    :data:`~stages_of_inference.study.registry.REGISTRY`, where ``"all"`` and ``"fast"`` stand for
    their selections (:data:`SELECTIONS`); duplicates are dropped (the first kept). A name that
    is not registered is refused in one line.

    Example:
        >>> select_analyses("neurons"), select_analyses(["neurons", "robustness", "neurons"])
        (('neurons',), ('neurons', 'robustness'))
    """
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"analyses must be a name or a sequence of names of analyses, got {names!r}")
    chosen: list[str] = []
    for name in names:
        chosen += SELECTIONS[name]() if name in SELECTIONS else [name]
    unknown = [a for a in chosen if a not in REGISTRY]
    if unknown or not chosen:
        raise ValueError(f"unknown analyses {unknown or '(none given)'}; give 'all', 'fast' or names of: "
                         f"{', '.join(REGISTRY)}")
    return tuple(dict.fromkeys(chosen))


def _whole(value: Any, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return int(value)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _names(value: Any, name: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(v, str) and v for v in items):
        raise TypeError(f"{name} must be a name or a sequence of non-empty names (strings), got {value!r}")
    return tuple(items)


@dataclass(frozen=True)
class StudyConfig:
    """The settings of a study: saved as ``study.json`` and beside every result. Each field is
    also a ``stages-of-inference run`` option (:data:`~stages_of_inference.study.options.OPTIONS`).

    Attributes:
        models: model names (embedded keys, TransformerLens names, folders or ``.gguf`` files);
            one name or any sequence of names, kept as a tuple (as are ``analyses`` and
            ``static_formats``).
        corpus: a bundled corpus name, a text file or a folder.
        n_tokens: tokens in the main batch (``n_tokens // seq_len`` sequences, BOS included).
        seq_len: tokens per sequence, BOS first.
        seed: which text windows are drawn, and the prompts of the subjoiner analysis.
        analyses: the analyses to run: names in :data:`~stages_of_inference.study.registry.REGISTRY`,
            or ``"all"`` / ``"fast"`` for those selections (:func:`select_analyses`: one name is
            taken as one analysis, never as letters; duplicates are dropped).
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
        cloze_items: cloze items of the task-damage analysis, drawn from the corpus (``seed``).
        cloze_file: a JSON-lines file of ``{"context", "answer"}`` items used instead (``None``: from the corpus).
        generation_prompts: prompts of the task-damage analysis's generation check (the first
            sequences of the main batch, cut to 16 tokens; at most as many as it has).
        precision: ``"fp32"`` (the paper's setting), ``"bf16"`` or ``"fp16"``: the dtype of the
            models' matrix products and attention in every analysis that runs them
            (:mod:`stages_of_inference.precision`); the sweep then measures its deviation from fp32.
        backend: ``"auto"``, ``"hooked"`` or ``"bridge"``: how models given by name are loaded
            (:func:`stages_of_inference.models.load_model`). On the Bridge the study runs the
            analyses marked for it and says which it left out (docs/backends.md).
        bootstrap: resamples of the sequences behind each stage boundary's 90 % interval (0: no
            intervals; docs/stages/beyond.md). Read when the stages are placed, so changing it
            reuses every finished analysis.
        tuned_lens_steps: optimiser steps of the tuned lens the ``tuned_lens`` analysis trains on
            the study's training split (:class:`~stages_of_inference.tuned_lens.TuningSettings`).
        jacobian_lens_prompts: windows of the training split the opt-in ``jacobian_lens``
            analysis fits on (each costs ``d_model / 8`` backward passes of 8 copies of it:
            docs/tuned-lens.md).

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
    analyses: Sequence[str] = field(default_factory=default_analyses)
    heavy_fraction: float = 0.5
    k: int = 5
    probe_label: str = "continues_word"
    subjoiner_prompts: int = 64
    kurtosis_threshold: float = 10.0
    batch_size: int = 8
    table_format: str = "parquet"
    static_formats: Sequence[str] = ("png",)
    device: str | None = None
    cloze_items: int = 24
    cloze_file: str | None = None
    generation_prompts: int = 4
    precision: str = "fp32"
    backend: str = "auto"
    bootstrap: int = 200
    tuned_lens_steps: int = DEFAULT_STEPS
    jacobian_lens_prompts: int = 8

    def __post_init__(self) -> None:
        models = _names(self.models, "models")
        if not models:
            raise ValueError("models is empty: name at least one model (e.g. 'smollm2-135m')")
        if len(set(models)) != len(models):
            raise ValueError(f"a model is listed twice: {list(models)}")
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "analyses", select_analyses(self.analyses))
        object.__setattr__(self, "static_formats", _names(self.static_formats, "static_formats") if self.static_formats
                           else ())
        if not isinstance(self.corpus, str) or not self.corpus:
            raise TypeError(f"corpus must be a bundled corpus name, a text file or a folder (a string), got {self.corpus!r}")
        for name in ("seq_len", "n_tokens", "seed", "k", "subjoiner_prompts", "cloze_items", "generation_prompts", "bootstrap",
                     "tuned_lens_steps", "jacobian_lens_prompts"):
            object.__setattr__(self, name, _whole(getattr(self, name), name))
        for name in ("heavy_fraction", "kurtosis_threshold"):
            object.__setattr__(self, name, _number(getattr(self, name), name))
        self._check_values()
        self._check_lenses()

    def _check_lenses(self) -> None:
        if self.tuned_lens_steps < 1:
            raise ValueError(f"tuned_lens_steps must be a positive number of optimiser steps, got {self.tuned_lens_steps}")
        most = _builtin.TUNED_LENS_SEQUENCES
        if not 1 <= self.jacobian_lens_prompts <= most:
            raise ValueError(f"jacobian_lens_prompts must be 1 .. {most} (the training split's windows), got "
                             f"{self.jacobian_lens_prompts}")

    def _check_values(self) -> None:
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be an integer of at least 8 tokens, got {self.seq_len!r}")
        if self.n_tokens < 2 * self.seq_len:
            raise ValueError(f"n_tokens must be at least two sequences of seq_len {self.seq_len} ({2 * self.seq_len} "
                             f"tokens), got {self.n_tokens!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a whole number in 0 .. 2**63 - 1, got {self.seed!r}")
        if not 0 < self.heavy_fraction <= 1:
            raise ValueError(f"heavy_fraction must lie in (0, 1], got {self.heavy_fraction}")
        if self.k < 1:
            raise ValueError(f"k must be a positive number of previous tokens, got {self.k}")
        object.__setattr__(self, "batch_size", check_count(self.batch_size, "batch_size", "a positive number of sequences"))
        object.__setattr__(self, "device", check_device(self.device))
        check_precision(self.precision)
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {self.backend!r}")
        if self.cloze_file is not None and not (isinstance(self.cloze_file, str) and Path(self.cloze_file).is_file()):
            raise ValueError(f"cloze_file {self.cloze_file!r} is not a file (a JSON-lines file of context/answer items)")
        if self.cloze_items < 1 or self.generation_prompts < 1:
            raise ValueError("cloze_items and generation_prompts must be positive numbers")
        if self.bootstrap != 0 and self.bootstrap < 10:
            raise ValueError(f"bootstrap must be 0 (no intervals) or at least 10 resamples, got {self.bootstrap}")
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
    def from_dict(cls, data: Any) -> StudyConfig:
        """Settings from :meth:`to_dict` (unknown keys are refused; every value is checked).

        Example:
            >>> StudyConfig.from_dict({"n_tokens": 512}).n_sequences
            4
        """
        if not isinstance(data, dict):
            raise ValueError(f"study settings are a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown study settings {unknown}; known: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> StudyConfig:
        """Read settings written by :meth:`to_json` (unknown keys are refused)."""
        return cls.from_dict(json.loads(text))


def check_inputs(config: StudyConfig) -> None:
    """Read what the settings name before any model loads: the corpus must be there (a missing
    file or folder, or a dataset without a hub, is refused in bounded time) and, when the task
    analysis runs on a cloze file, every line of it must be an item: so that a bad input is found
    before minutes of model work, not after.
    """
    check_corpus(config.corpus)
    if config.cloze_file is not None and "task" in config.analyses:
        load_cloze_items(config.cloze_file)


_missing = sorted({f.name for f in dataclasses.fields(StudyConfig)} ^ set(OPTIONS))
if _missing:  # every setting is a `run` option, and every option a setting
    raise RuntimeError(f"StudyConfig fields and study.options.OPTIONS differ: {_missing}")


def from_args(args: argparse.Namespace, **overrides: Any) -> StudyConfig:
    """The :class:`StudyConfig` of options parsed with :func:`~stages_of_inference.study.options.add_options`
    (a setting whose option was not given keeps its default).

    Example:
        >>> from stages_of_inference.study.options import add_options
        >>> parser = argparse.ArgumentParser(); add_options(parser)
        >>> c = from_args(parser.parse_args(["--n-tokens", "512", "--model", "gemma3-270m"]))
        >>> c.models, c.n_tokens, c.seq_len
        (('gemma3-270m',), 512, 128)
    """
    values = {name: getattr(args, f"config_{name}") for name in OPTIONS}
    given = {k: v for k, v in values.items() if v is not None}
    return StudyConfig(**{**given, **overrides})
