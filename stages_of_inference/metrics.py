"""Per-token metrics of next-token distributions, in fp32, streamed in chunks.

Conventions (PAPER.md, "Per-token metrics"):

* logits at position ``p`` predict token ``p + 1``;
* the scored positions are ``1 .. T-2`` of a ``T``-token sequence: the BOS position is left out,
  and every scored position has a true next token, so KL, entropy, loss and accuracy all
  describe the same set of predictions (the authors' code compared loss rows one position off
  against its KL rows; here they line up);
* KL(P_original || P_intervened) in nats over the full vocabulary;
* entropy in bits with probabilities clamped at ``1e-9`` inside the logarithm, as the authors did;
* loss is the next-token cross-entropy in nats; accuracy is argmax == true next token.

Every function upcasts to fp32 before ``log_softmax``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

PROB_CLAMP = 1e-9
"""Probabilities are clamped at this value inside ``log2`` for entropies, as the authors did."""

DEFAULT_CHUNK_TOKENS = 512
"""Token positions reduced at once: one chunk holds ``DEFAULT_CHUNK_TOKENS x d_vocab`` fp32 numbers."""


def log_probs(logits: Float[Tensor, "*shape d_vocab"]) -> Float[Tensor, "*shape d_vocab"]:
    """Log-probabilities in fp32.

    Example:
        >>> import torch
        >>> log_probs(torch.zeros(2, 4)).exp().sum(-1)
        tensor([1., 1.])
    """
    return logits.float().log_softmax(dim=-1)


def entropy_bits(logprobs: Float[Tensor, "*shape d_vocab"]) -> Float[Tensor, "*shape"]:
    """Entropy in bits of each distribution, probabilities clamped at ``PROB_CLAMP`` in the log.

    Example:
        >>> import torch
        >>> entropy_bits(torch.full((8,), 1 / 8).log())
        tensor(3.)
    """
    probs = logprobs.float().exp()
    return -(probs * torch.log2(probs.clamp_min(PROB_CLAMP))).sum(dim=-1)


def kl_nats(
    ref_logprobs: Float[Tensor, "*shape d_vocab"], logprobs: Float[Tensor, "*shape d_vocab"]
) -> Float[Tensor, "*shape"]:
    """KL(P_ref || P) in nats over the last axis.

    Example:
        >>> import torch
        >>> p = torch.tensor([0.5, 0.5]).log(); q = torch.tensor([0.25, 0.75]).log()
        >>> round(kl_nats(p, q).item(), 4)
        0.1438
    """
    ref_logprobs = ref_logprobs.float()
    return (ref_logprobs.exp() * (ref_logprobs - logprobs.float())).sum(dim=-1)


def next_token_loss(
    logprobs: Float[Tensor, "*shape d_vocab"], targets: Int[Tensor, "*shape"]
) -> Float[Tensor, "*shape"]:
    """Cross-entropy in nats of the true next tokens ``targets`` under ``logprobs``.

    Example:
        >>> import torch
        >>> next_token_loss(torch.full((3, 4), 0.25).log(), torch.tensor([0, 1, 3]))
        tensor([1.3863, 1.3863, 1.3863])
    """
    return -logprobs.float().gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def scored_positions(seq_len: int) -> slice:
    """The positions whose predictions are scored: ``1 .. seq_len - 2`` (no BOS, has a target).

    Example:
        >>> scored_positions(6)
        slice(1, 5, None)
    """
    if seq_len < 3:
        raise ValueError(f"need at least 3 positions (BOS, a scored position, its target), got {seq_len}")
    return slice(1, seq_len - 1)


def targets_for(tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch scored"]:
    """True next tokens of the scored positions: ``tokens[:, 2:]``."""
    return tokens[:, scored_positions(tokens.shape[1]).start + 1 :]


def distribution_metrics(
    logprobs: Float[Tensor, "n d_vocab"],
    targets: Int[Tensor, " n"],
    ref_logprobs: Float[Tensor, "n d_vocab"] | None = None,
    ref_top1: Int[Tensor, " n"] | None = None,
) -> dict[str, Tensor]:
    """All per-token numbers of one block of predictions (rows are token positions).

    Returns ``loss`` (nats), ``entropy_bits``, ``top1`` (argmax id), ``correct`` (top-1 equals the
    target), ``confidence`` (top-1 probability), and, given a reference, ``kl_nats`` =
    KL(reference || this) and ``agree`` (same top-1 as the reference; its top-1 is taken from
    ``ref_top1`` when given, else from ``ref_logprobs``).

    Example:
        >>> import torch
        >>> lp = torch.tensor([[0.7, 0.2, 0.1]]).log()
        >>> m = distribution_metrics(lp, torch.tensor([0]), ref_logprobs=lp)
        >>> m["correct"].item(), m["agree"].item(), round(m["kl_nats"].item(), 6)
        (True, True, 0.0)
    """
    logprobs = logprobs.float()
    top_lp, top1 = logprobs.max(dim=-1)
    out: dict[str, Tensor] = {
        "loss": next_token_loss(logprobs, targets),
        "entropy_bits": entropy_bits(logprobs),
        "top1": top1,
        "correct": top1 == targets,
        "confidence": top_lp.exp(),
    }
    if ref_logprobs is not None:
        out["kl_nats"] = kl_nats(ref_logprobs, logprobs)
        if ref_top1 is None:
            ref_top1 = ref_logprobs.argmax(dim=-1)
    if ref_top1 is not None:
        out["agree"] = top1 == ref_top1
    return out


def stream_metrics(
    n_rows: int,
    logprobs_rows: Callable[[slice], Float[Tensor, "n d_vocab"]],
    targets: Int[Tensor, " n_rows"],
    ref_logprobs_rows: Callable[[slice], Float[Tensor, "n d_vocab"]] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict[str, Tensor]:
    """Apply :func:`distribution_metrics` to ``n_rows`` predictions, ``chunk_tokens`` rows at a time.

    ``logprobs_rows(rows)`` returns the fp32 log-probabilities of a slice of rows; only one chunk of
    ``chunk_tokens x d_vocab`` numbers is alive at a time, whatever ``n_rows`` is.

    Example:
        >>> import torch
        >>> lp = torch.randn(10, 5).log_softmax(-1)
        >>> m = stream_metrics(10, lambda r: lp[r], torch.zeros(10, dtype=torch.long), chunk_tokens=3)
        >>> bool(torch.allclose(m["loss"], -lp[:, 0]))
        True
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive number of token positions, got {chunk_tokens}")
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, n_rows, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, n_rows))
        ref = None if ref_logprobs_rows is None else ref_logprobs_rows(rows)
        for key, value in distribution_metrics(logprobs_rows(rows), targets[rows], ref).items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


def sequence_metrics(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    ref_logits: Float[Tensor, "batch pos d_vocab"] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict[str, Tensor]:
    """Per-token metrics of a batch of logits, on the scored positions, shaped ``[batch, scored]``.

    Example:
        >>> import torch
        >>> tokens = torch.tensor([[0, 1, 2, 3]])
        >>> logits = torch.zeros(1, 4, 5)
        >>> m = sequence_metrics(logits, tokens)
        >>> m["loss"].shape, round(m["entropy_bits"][0, 0].item(), 4)
        (torch.Size([1, 2]), 2.3219)
    """
    if logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree on [batch, pos]")
    batch, pos = tokens.shape
    keep = scored_positions(pos)
    flat = logits[:, keep].reshape(-1, logits.shape[-1])
    ref_flat = None if ref_logits is None else ref_logits[:, keep].reshape(-1, ref_logits.shape[-1])
    targets = targets_for(tokens).reshape(-1)
    out = stream_metrics(
        flat.shape[0],
        lambda rows: log_probs(flat[rows]),
        targets,
        None if ref_flat is None else (lambda rows: log_probs(ref_flat[rows])),
        chunk_tokens=chunk_tokens,
    )
    return {key: value.reshape(batch, -1) for key, value in out.items()}


def mean_and_sem(values: Float[Tensor, "batch n"] | Bool[Tensor, "batch n"]) -> tuple[float, float]:
    """Mean over all entries, and the standard error over sequences (rows).

    The standard error is that of the per-sequence means, ``std / sqrt(batch)`` (0 for one row).

    Example:
        >>> import torch
        >>> mean_and_sem(torch.tensor([[1.0, 3.0], [3.0, 5.0]]))
        (3.0, 1.0)
    """
    values = values.double()
    per_seq = values.mean(dim=1)
    sem = float(per_seq.std(unbiased=True) / per_seq.numel() ** 0.5) if per_seq.numel() > 1 else 0.0
    return float(values.mean()), sem
