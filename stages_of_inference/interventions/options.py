"""The engine's settings as one frozen, validated object.

:class:`EngineOptions` is checked once, where a user hands settings to the library (the public
functions build it from their keyword arguments); everything below takes the object and trusts
it. Counts are checked by :func:`stages_of_inference._utils.check_count`, the package's one check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from stages_of_inference._utils import check_count
from stages_of_inference.interventions.unembed import UNEMBED_BLOCK
from stages_of_inference.metrics import DEFAULT_CHUNK_TOKENS
from stages_of_inference.precision import check_precision

__all__ = ["EngineOptions", "STACK_TOKENS_ACCELERATOR", "STACK_TOKENS_CPU", "check_count"]

STACK_TOKENS_CPU = 1024
"""Default ``stack_tokens`` on a CPU: the largest block call before the products stop getting
faster on the 2-core machine the library is developed on (docs/benchmarks.md)."""

STACK_TOKENS_ACCELERATOR = 8192
"""Default ``stack_tokens`` on a GPU or other accelerator, where larger products keep getting faster."""


@dataclass(frozen=True)
class EngineOptions:
    """How the sweep executes (not what it computes: every setting but ``precision`` gives the same
    numbers to fp32 rounding).

    Attributes:
        batch_size: sequences per trie pass.
        chunk_tokens: token positions unembedded and reduced at a time.
        stack_tokens: with the fast path, plans that run the same block at the same step are
            stacked into one block call of at most this many token positions; ``None``: the
            device's default (:meth:`stack_tokens_for`).
        fast_path: run blocks by the hook-free fast path wherever nothing could observe it.
        per_token: also keep the per-token table.
        progress: show a progress bar.
        unembed_block: vocabulary columns the blocked unembedding computes at a time.
        precision: ``"fp32"`` (the paper's setting), ``"bf16"`` or ``"fp16"``: the dtype of the
            matrix products and the attention (:mod:`stages_of_inference.precision`); this one
            setting does change the numbers, by what the precision check measures.
        layer_effects: also measure, for every block a plan runs off the unmodified path, how much
            what it writes to the residual stream changed (:mod:`~stages_of_inference.interventions.effects`).
        score_last: score only the last this many scored positions of every sequence (the
            predictions of its last ``score_last`` tokens: the answer of a cloze item, a
            continuation), so nothing else is unembedded; ``None``: every position ``1 .. T-2``.
            Like ``precision``, it changes what is measured (the metrics pool fewer tokens).

    Example:
        >>> EngineOptions(batch_size=4).stack_tokens_for("cpu")
        1024
        >>> EngineOptions(chunk_tokens=0)
        Traceback (most recent call last):
        ...
        ValueError: chunk_tokens must be a positive number of token positions, got 0
    """

    batch_size: int = 8
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    stack_tokens: int | None = None
    fast_path: bool = True
    per_token: bool = False
    progress: bool = True
    unembed_block: int = UNEMBED_BLOCK
    precision: str = "fp32"
    layer_effects: bool = False
    score_last: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_size", check_count(self.batch_size, "batch_size", "a positive number of sequences"))
        positions = "a positive number of token positions"
        object.__setattr__(self, "chunk_tokens", check_count(self.chunk_tokens, "chunk_tokens", positions))
        if self.stack_tokens is not None:
            stack = check_count(self.stack_tokens, "stack_tokens", f"{positions} (or None for the default)")
            object.__setattr__(self, "stack_tokens", stack)
        object.__setattr__(self, "unembed_block", check_count(self.unembed_block, "unembed_block", "a positive number of vocabulary columns"))
        check_precision(self.precision)
        if self.score_last is not None:
            last = check_count(self.score_last, "score_last", "a positive number of positions (or None for all)")
            object.__setattr__(self, "score_last", last)
        for name in ("fast_path", "per_token", "progress", "layer_effects"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def stack_tokens_for(self, device: str | torch.device) -> int:
        """``stack_tokens``, or the default for ``device``: :data:`STACK_TOKENS_CPU` on a CPU,
        :data:`STACK_TOKENS_ACCELERATOR` elsewhere.
        """
        if self.stack_tokens is not None:
            return self.stack_tokens
        return STACK_TOKENS_CPU if torch.device(device).type == "cpu" else STACK_TOKENS_ACCELERATOR

    def scored(self, seq_len: int) -> slice:
        """The positions scored in sequences of ``seq_len`` tokens: ``1 .. seq_len - 2``, or the
        last ``score_last`` of them.

        Example:
            >>> EngineOptions().scored(6), EngineOptions(score_last=2).scored(6)
            (slice(1, 5, None), slice(3, 5, None))
            >>> EngineOptions(score_last=5).scored(6)
            Traceback (most recent call last):
            ...
            ValueError: score_last=5 but sequences of 6 tokens have 4 scored positions (1 .. 4)
        """
        if self.score_last is None:
            return slice(1, seq_len - 1)
        if self.score_last > seq_len - 2:
            raise ValueError(f"score_last={self.score_last} but sequences of {seq_len} tokens have {seq_len - 2} scored "
                             f"positions (1 .. {seq_len - 2})")
        return slice(seq_len - 1 - self.score_last, seq_len - 1)

    @classmethod
    def from_settings(cls, options: EngineOptions | None, settings: dict[str, Any]) -> EngineOptions:
        """``options``, or one built from keyword ``settings`` (its fields); never both.

        Example:
            >>> EngineOptions.from_settings(None, {"batch_size": 2}).batch_size
            2
            >>> EngineOptions.from_settings(None, {"batchsize": 2})
            Traceback (most recent call last):
            ...
            ValueError: unknown engine setting(s) ['batchsize']; known: batch_size, chunk_tokens, stack_tokens, fast_path, per_token, progress, unembed_block, precision, layer_effects, score_last
        """
        if options is not None and not isinstance(options, EngineOptions):
            raise TypeError(f"options must be an EngineOptions, got {type(options).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(f"unknown engine setting(s) {unknown}; known: {', '.join(known)}")
        if options is not None and settings:
            raise ValueError(f"give either options or its fields as keywords, not both (got options and {sorted(settings)})")
        return options if options is not None else cls(**settings)
