"""The ``stages-of-inference run`` options of the study's settings, declared once.

Each :class:`~stages_of_inference.study.config.StudyConfig` field has one entry in
:data:`OPTIONS` (its flag, help text and argparse settings); :func:`add_options` adds them to a
parser, and ``StudyConfig`` checks at import that every field has one. This module imports
nothing but ``argparse`` and the package's light checks, so building the command line's parser loads neither torch nor the
analyses.
"""

from __future__ import annotations

import argparse
from typing import Any

from stages_of_inference._checks import BACKEND_CHOICES, PRECISIONS

__all__ = ["OPTIONS", "add_options", "analyses_arg", "positive"]

def positive(text: str) -> int:
    """An argparse type: a positive whole number.

    Example:
        >>> positive("3")
        3
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def analyses_arg(text: str) -> tuple[str, ...]:
    """An argparse type: ``all``, ``fast`` or a comma list of analysis names (checked against the
    registry when the settings are built, :meth:`StudyConfig.__post_init__`).

    Example:
        >>> analyses_arg("robustness, neurons"), analyses_arg("all")
        (('robustness', 'neurons'), ('all',))
    """
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    if not names:
        raise argparse.ArgumentTypeError("no analyses given; give 'all', 'fast' or a comma list of analyses")
    return names


def _option(flag: str, help: str, **kwargs: Any) -> dict[str, Any]:  # noqa: A002 - argparse's name
    return {"flag": flag, "help": help, **kwargs}


OPTIONS: dict[str, dict[str, Any]] = {
    "models": _option("--model", "a model to study; repeat for several, overlaid on relative depth "
                      "(default: smollm2-135m)", action="append"),
    "corpus": _option("--corpus", "bundled corpus (default, austen, melville), text file or folder (default: default)"),
    "n_tokens": _option("--n-tokens", "tokens in the main batch; the lens, sharpening and repetition analyses use half "
                        "(default: 1024: about four minutes for smollm2-135m on 2 CPU cores)", type=positive),
    "seq_len": _option("--seq-len", "tokens per sequence, BOS first (default: 128)", type=positive),
    "seed": _option("--seed", "which text windows and prompts are drawn (default: 0)", type=int),
    "analyses": _option("--analyses", "'all' (default), 'fast', or a comma list of the registered analyses "
                        "(duplicates are dropped)", type=analyses_arg),
    "heavy_fraction": _option("--heavy-fraction", "share of the sequences the lens, sharpening and repetition "
                              "analyses use (default: 0.5)", type=float),
    "k": _option("--k", "previous tokens of the attention analysis (default: 5, the paper's)", type=positive),
    "probe_label": _option("--probe-label", "the probes' per-token label (default: continues_word)",
                           choices=("continues_word", "next_starts_word")),
    "subjoiner_prompts": _option("--subjoiner-prompts", "most prompts of each kind in the subjoiner analysis "
                                 "(default: 64)", type=positive),
    "kurtosis_threshold": _option("--kurtosis-threshold", "prediction / suppression neuron threshold (default: 10, "
                                  "the paper's)", type=float),
    "batch_size": _option("--batch-size", "sequences per forward pass (default: 8)", type=positive),
    "table_format": _option("--format", "data file format (default: parquet)", choices=("parquet", "csv")),
    "static_formats": _option("--no-static", "no PNG copies of the figures even if kaleido is installed",
                              action="store_const", const=()),
    "device": _option("--device", "cpu, cuda or mps (default: the best available)"),
    "cloze_items": _option("--cloze-items", "cloze items of the task analysis, from the corpus (default: 24, small "
                           "for time: each item costs a 59-plan sweep over ~26 tokens; 256 gives a usable estimate)",
                           type=positive),
    "cloze_file": _option("--cloze-file", "a JSON-lines file of {\"context\": ..., \"answer\": ...} items for the task "
                          "analysis (default: items from the corpus)"),
    "generation_prompts": _option("--generation-prompts", "prompts of the task analysis's generation check "
                                  "(default: 4)", type=positive),
    "precision": _option("--precision", "dtype of the models' matrix products and attention; metrics stay fp32 "
                         "(default: fp32, the paper's)", choices=PRECISIONS),
    "backend": _option("--backend", "TransformerLens backend: hooked (HookedTransformer), bridge (TransformerBridge) "
                       "or auto (hooked where installed; default: auto)", choices=BACKEND_CHOICES),
    "bootstrap": _option("--bootstrap", "resamples of the sequences behind each stage boundary's 90 %% interval "
                         "(default: 200; 0: none)", type=int),
    "tuned_lens_steps": _option("--tuned-lens-steps", "optimiser steps of the tuned lens trained on the study's "
                                "training split (default: 24)", type=positive),
    "jacobian_lens_prompts": _option("--jacobian-lens-prompts", "windows of the training split the opt-in "
                                     "jacobian_lens analysis fits on (default: 8; about 2 minutes each for "
                                     "SmolLM2 on 2 CPU cores)", type=positive),
}
"""Study setting -> its ``run`` option (``flag``, ``help`` and argparse settings). An option not
given on the command line leaves the setting at its default."""


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add one option per study setting (:data:`OPTIONS`) to ``parser``; each is stored as
    ``config_<setting>`` and is ``None`` when not given.

    Example:
        >>> p = argparse.ArgumentParser(); add_options(p)
        >>> p.parse_args(["--n-tokens", "512"]).config_n_tokens, p.parse_args([]).config_seed
        (512, None)
    """
    for name, declared in OPTIONS.items():
        spec = dict(declared)
        flag = spec.pop("flag")
        spec["default"] = None
        if spec.get("action") not in ("store_const", "store_true"):
            spec.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        parser.add_argument(flag, dest=f"config_{name}", **spec)
