"""The settings of a study (:class:`StudyConfig`), which also declare the command line's options."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages_of_inference._checks import BACKEND_CHOICES, PRECISIONS, check_count, check_device, check_precision

__all__ = ["DEFAULT_OUT_DIR", "StudyConfig", "add_options", "analysis_names", "from_args"]

DEFAULT_OUT_DIR = "reports"


def _cli(flag: str, help: str, **kwargs: Any) -> dict[str, Any]:  # noqa: A002 - argparse's name
    """Field metadata: the field's ``stages-of-inference run`` option."""
    return {"cli": {"flag": flag, "help": help, **kwargs}}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def analysis_names() -> tuple[str, ...]:
    """The registered analyses, in the order a study runs them."""
    from stages_of_inference.study.registry import REGISTRY

    return tuple(REGISTRY)


def _all_analyses() -> tuple[str, ...]:
    from stages_of_inference.study.registry import default_analyses

    return default_analyses()


def _analyses_arg(text: str) -> tuple[str, ...]:
    from stages_of_inference.study.registry import default_analyses, fast_analyses

    if text == "all":
        return default_analyses()
    if text == "fast":
        return fast_analyses()
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    known = analysis_names()
    unknown = [a for a in names if a not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown analyses {unknown or '(none)'}; give 'all', 'fast' or a comma list of: {', '.join(known)}")
    return names


@dataclass(frozen=True)
class StudyConfig:
    """The settings of a study: saved as ``study.json`` and beside every result, and what the
    ``stages-of-inference run`` options fill in: each field's metadata declares its command-line
    option (:func:`add_options`, :func:`from_args`), so options are declared once.

    Attributes:
        models: model names (embedded keys, TransformerLens names, folders or ``.gguf`` files);
            any sequence of names, kept as a tuple (as are ``analyses`` and ``static_formats``).
        corpus: a bundled corpus name, a text file or a folder.
        n_tokens: tokens in the main batch (``n_tokens // seq_len`` sequences, BOS included).
        seq_len: tokens per sequence, BOS first.
        seed: which text windows are drawn, and the prompts of the subjoiner analysis.
        analyses: the analyses to run (names in :data:`stages_of_inference.study.registry.REGISTRY`).
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

    Example:
        >>> c = StudyConfig(n_tokens=512)
        >>> c.n_sequences, c.heavy_sequences, StudyConfig.from_json(c.to_json()) == c
        (4, 2, True)
    """

    models: Sequence[str] = field(default=("smollm2-135m",), metadata=_cli(
        "--model", "a model to study; repeat for several, overlaid on relative depth (default: smollm2-135m)",
        action="append", default=None))
    corpus: str = field(default="default", metadata=_cli(
        "--corpus", "bundled corpus (default, austen, melville), text file or folder (default: %(default)s)"))
    n_tokens: int = field(default=1024, metadata=_cli(
        "--n-tokens", "tokens in the main batch; the lens, sharpening and repetition analyses use half "
        "(default: %(default)s: about four minutes for smollm2-135m on 2 CPU cores)", type=_positive))
    seq_len: int = field(default=128, metadata=_cli(
        "--seq-len", "tokens per sequence, BOS first (default: %(default)s)", type=_positive))
    seed: int = field(default=0, metadata=_cli(
        "--seed", "which text windows and prompts are drawn (default: %(default)s)", type=int))
    analyses: Sequence[str] = field(default_factory=_all_analyses, metadata=_cli(
        "--analyses", "'all' (default), 'fast', or a comma list of the registered analyses", type=_analyses_arg,
        default=None))
    heavy_fraction: float = field(default=0.5, metadata=_cli(
        "--heavy-fraction", "share of the sequences the lens, sharpening and repetition analyses use "
        "(default: %(default)s)", type=float))
    k: int = field(default=5, metadata=_cli(
        "--k", "previous tokens of the attention analysis (default: %(default)s, the paper's)", type=_positive))
    probe_label: str = field(default="continues_word", metadata=_cli(
        "--probe-label", "the probes' per-token label (default: %(default)s)",
        choices=("continues_word", "next_starts_word")))
    subjoiner_prompts: int = field(default=64, metadata=_cli(
        "--subjoiner-prompts", "most prompts of each kind in the subjoiner analysis (default: %(default)s)",
        type=_positive))
    kurtosis_threshold: float = field(default=10.0, metadata=_cli(
        "--kurtosis-threshold", "prediction / suppression neuron threshold (default: %(default)s, the paper's)",
        type=float))
    batch_size: int = field(default=8, metadata=_cli(
        "--batch-size", "sequences per forward pass (default: %(default)s)", type=_positive))
    table_format: str = field(default="parquet", metadata=_cli(
        "--format", "data file format (default: %(default)s)", choices=("parquet", "csv")))
    static_formats: Sequence[str] = field(default=("png",), metadata=_cli(
        "--no-static", "no PNG copies of the figures even if kaleido is installed", action="store_const",
        const=(), default=None))
    device: str | None = field(default=None, metadata=_cli(
        "--device", "cpu, cuda or mps (default: the best available)"))
    cloze_items: int = field(default=24, metadata=_cli(
        "--cloze-items", "cloze items of the task analysis, from the corpus (default: %(default)s, small for time: "
        "each item costs a 59-plan sweep over ~26 tokens; 256 gives a usable estimate)", type=_positive))
    cloze_file: str | None = field(default=None, metadata=_cli(
        "--cloze-file", "a JSON-lines file of {\"context\": ..., \"answer\": ...} items for the task analysis "
        "(default: items from the corpus)"))
    generation_prompts: int = field(default=4, metadata=_cli(
        "--generation-prompts", "prompts of the task analysis's generation check (default: %(default)s)",
        type=_positive))
    precision: str = field(default="fp32", metadata=_cli(
        "--precision", "dtype of the models' matrix products and attention; metrics stay fp32 (default: %(default)s, "
        "the paper's)", choices=PRECISIONS))
    backend: str = field(default="auto", metadata=_cli(
        "--backend", "TransformerLens backend: hooked (HookedTransformer), bridge (TransformerBridge) or auto (hooked "
        "where installed; default: %(default)s)", choices=BACKEND_CHOICES))

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
        known = analysis_names()
        unknown = [a for a in self.analyses if a not in known]
        if unknown or not self.analyses:
            raise ValueError(f"unknown analyses {unknown or '(none given)'}; known: {', '.join(known)}")
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
        object.__setattr__(self, "batch_size", check_count(self.batch_size, "batch_size", "a positive number of sequences"))
        object.__setattr__(self, "device", check_device(self.device))
        check_precision(self.precision)
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {self.backend!r}")
        self._check_task()
        if self.subjoiner_prompts < 16:
            raise ValueError(f"subjoiner_prompts must be at least 16, got {self.subjoiner_prompts}")
        if self.table_format not in ("parquet", "csv"):
            raise ValueError(f"table_format must be 'parquet' or 'csv', got {self.table_format!r}")
        bad = [f for f in self.static_formats if f not in ("png", "svg")]
        if bad:
            raise ValueError(f"unknown static figure formats {bad}; allowed: 'png', 'svg'")
        if self.probe_label not in ("continues_word", "next_starts_word"):
            raise ValueError(f"probe_label must be 'continues_word' or 'next_starts_word', got {self.probe_label!r}")

    def _check_task(self) -> None:
        """The task-damage analysis's settings."""
        if self.cloze_file is not None and not Path(self.cloze_file).is_file():
            raise ValueError(f"cloze_file {self.cloze_file!r} is not a file (a JSON-lines file of context/answer items)")

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
    def from_json(cls, text: str) -> StudyConfig:
        """Read settings written by :meth:`to_json` (unknown keys are refused)."""
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown study settings {unknown}; known: {sorted(names)}")
        return cls(**data)




def add_options(parser: argparse.ArgumentParser) -> None:
    """Add one option per :class:`StudyConfig` field, as its metadata declares it."""
    for f in dataclasses.fields(StudyConfig):
        spec = dict(f.metadata["cli"])
        flag = spec.pop("flag")
        spec.setdefault("default", f.default if f.default is not dataclasses.MISSING else None)
        if spec.get("action") not in ("store_const", "store_true"):
            spec.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        parser.add_argument(flag, dest=f"config_{f.name}", **spec)


def from_args(args: argparse.Namespace, **overrides: Any) -> StudyConfig:
    """The :class:`StudyConfig` of parsed options (a field whose option was not given keeps its default).

    Example:
        >>> parser = argparse.ArgumentParser(); add_options(parser)
        >>> c = from_args(parser.parse_args(["--n-tokens", "512", "--model", "gemma3-270m"]))
        >>> c.models, c.n_tokens, c.seq_len
        (('gemma3-270m',), 512, 128)
    """
    values = {f.name: getattr(args, f"config_{f.name}") for f in dataclasses.fields(StudyConfig)}
    given = {k: v for k, v in values.items() if v is not None}
    return StudyConfig(**{**given, **overrides})
