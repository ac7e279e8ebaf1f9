"""Per-token metrics of next-token distributions, in fp32, streamed in chunks.

Conventions (PAPER.md, "Per-token metrics"):

* logits at position ``p`` predict token ``p + 1``;
* the scored positions are ``1 .. T-2`` of a ``T``-token sequence: the BOS position is left out,
  and every scored position has a true next token, so KL, entropy, loss and accuracy all
  describe the same set of predictions (the authors' code compared loss rows one position off
  against its KL rows; here they line up);
* KL(P_original || P_intervened) in nats over the full vocabulary;
* entropy in bits of the clamped probabilities, exactly as the authors computed it
  (``p = clamp(softmax(logits), min=1e-9)``, ``H = -sum(p * log2 p)``; their
  ``model_intervention.py`` and ``entropy_calculation.ipynb``): the clamped vector's own entropy,
  so every token below ``1e-9`` adds ``1e-9 * log2(1e9)`` bits;
* loss is the next-token cross-entropy in nats; accuracy is argmax == true next token.

Every function upcasts to fp32 before ``log_softmax``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Float64, Int
from torch import Tensor

from stages_of_inference._utils import check_count

__all__ = ["DEFAULT_CHUNK_TOKENS", "LinearReference", "PROB_CLAMP", "ROWS_AT_ONCE", "TokenMetrics",
    "ProbReference", "distribution_metrics", "entropy_bits", "kl_nats", "log_probs", "logit_metrics", "mean_and_sem",
    "next_token_loss", "scored_positions", "sequence_metrics", "stream_metrics", "targets_for"]

PROB_CLAMP = 1e-9
"""Probabilities are clamped from below at this value before the entropy is taken, as the authors did."""

_LOG_PROB_CLAMP = math.log(PROB_CLAMP)
_LN2 = math.log(2.0)

ROWS_AT_ONCE = 32
"""Rows :func:`logit_metrics` exponentiates and reduces at a time (a ``32 x d_vocab`` fp32 work
buffer: 6 MB for a 49k vocabulary, small enough to stay in a CPU's cache between passes)."""

class NonFiniteError(ValueError):
    """The model produced NaN or infinity: no number derived from it is returned (a NaN would be
    skipped by sums and means, and become a plausible-looking result).
    """


def first_nonfinite(values: Tensor, axis: int = 0) -> int | None:
    """The first index along ``axis`` whose slice holds a NaN or an infinity, or ``None``.

    Example:
        >>> import torch
        >>> first_nonfinite(torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [float("inf"), 1.0]]))
        1
    """
    bad = ~torch.isfinite(values.movedim(axis, 0).reshape(values.shape[axis], -1)).all(dim=1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


TokenMetrics = dict[str, Tensor]
"""Per-token metrics of ``n`` predictions, one ``[n]`` tensor per name: ``loss`` (nats),
``entropy_bits``, ``top1`` (token id), ``correct`` (bool), ``confidence`` (top-1 probability), and
against a reference ``kl_nats`` and ``agree`` (bool)."""

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
    """Entropy in bits of each distribution after its probabilities are clamped at ``PROB_CLAMP``
    (the authors' ``-sum(p * log2 p)`` of ``p = clamp(softmax, min=1e-9)``).

    Example:
        >>> import torch
        >>> entropy_bits(torch.full((8,), 1 / 8).log())
        tensor(3.)
    """
    probs = logprobs.float().exp().clamp_min(PROB_CLAMP)
    return -(probs * torch.log2(probs)).sum(dim=-1)


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
) -> TokenMetrics:
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
    out: TokenMetrics = {
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


@dataclass(frozen=True)
class LinearReference:
    """What KL(reference || q) needs of the reference distributions when q's logits are linear.

    For logits ``l = x @ W_U + b_U`` (no soft-cap) and a reference distribution ``p`` with
    log-probabilities ``lp``, per row::

        KL(p || softmax(l)) = sum(p * lp) - (x . (W_U @ p) + b_U . p) + logsumexp(l)

    so a reference row is summarised by ``neg_entropy = sum(p * lp)`` (nats), ``u = W_U @ p``
    (``d_model`` numbers) and ``c = b_U . p``: the full ``d_vocab`` reference is not kept. Build it
    with :meth:`from_logits`; index it with a slice of rows; :meth:`kl_nats` gives the KL.

    Attributes:
        neg_entropy: ``sum_v p_v log p_v`` per row, in nats (float64).
        u: ``W_U @ p`` per row (float64).
        c: ``b_U . p`` per row (float64).
        top1: the reference's top-1 token id per row (``max(dim=-1)``).

    Example:
        >>> import torch
        >>> w, b, x = torch.randn(4, 10), torch.randn(10), torch.randn(3, 4)
        >>> ref = LinearReference.from_logits(x @ w + b, w, b)
        >>> y = torch.randn(3, 4)
        >>> kl = ref.kl_nats(y, (y @ w + b).logsumexp(-1))
        >>> bool(torch.allclose(kl.float(), kl_nats(log_probs(x @ w + b), log_probs(y @ w + b)), atol=1e-5))
        True
    """

    neg_entropy: Float64[Tensor, " n"]
    u: Float64[Tensor, "n d_model"]
    c: Float64[Tensor, " n"]
    top1: Int[Tensor, " n"]

    def __getitem__(self, rows: slice) -> LinearReference:
        return LinearReference(self.neg_entropy[rows], self.u[rows], self.c[rows], self.top1[rows])

    def __len__(self) -> int:
        return self.top1.shape[0]

    @classmethod
    def from_logits(
        cls,
        logits: Float[Tensor, "n d_vocab"],
        W_U: Float[Tensor, "d_model d_vocab"],
        b_U: Float[Tensor, " d_vocab"] | None = None,
        rows_at_once: int = 64,
    ) -> LinearReference:
        """The summary of the reference distributions ``softmax(logits)``, for the unembedding
        ``W_U``, ``b_U`` (the one the compared logits are made with). ``logits`` is not modified.

        Computed in float64, ``rows_at_once`` rows at a time: the KL is a difference of terms
        much larger than itself, so their rounding errors must stay well under ``1e-6``. The
        float64 copy of ``W_U`` is made ``vocab_at_once`` columns at a time, never whole (for a
        49k vocabulary it would be a 226 MB copy).
        """
        logits = logits.float()
        top1 = logits.max(dim=-1).indices  # the same ids (ties included) as distribution_metrics
        d_model, d_vocab = W_U.shape
        vocab_at_once = 4096
        n = logits.shape[0]
        groups = [slice(s, min(s + rows_at_once, n)) for s in range(0, n, rows_at_once)]
        lse = logits.new_empty(n, dtype=torch.float64)
        neg_entropy = logits.new_empty(n, dtype=torch.float64)
        c = logits.new_zeros(n, dtype=torch.float64)
        for rows in groups:
            lp = logits[rows].double().log_softmax(dim=-1)
            p = lp.exp()
            lse[rows] = logits[rows, :1].double().squeeze(-1) - lp[:, 0]  # logsumexp = l_0 - lp_0
            neg_entropy[rows] = (p * lp).sum(dim=-1)
            if b_U is not None:
                c[rows] = p @ b_U.double()
        # u = W_U @ p, a block of the vocabulary at a time (p recomputed from lse per block)
        u = logits.new_zeros(n, d_model, dtype=torch.float64)
        for v0 in range(0, d_vocab, vocab_at_once):
            w64 = W_U[:, v0 : v0 + vocab_at_once].double()
            for rows in groups:
                p = (logits[rows, v0 : v0 + vocab_at_once].double() - lse[rows].unsqueeze(-1)).exp_()
                u[rows] += p @ w64.T
        return cls(neg_entropy, u, c, top1)

    def kl_nats(
        self, resid: Float[Tensor, "n d_model"], lse: Float[Tensor, " n"]
    ) -> Float64[Tensor, " n"]:
        """KL(reference || softmax(resid @ W_U + b_U)) in nats, float64, from the unembedding input
        ``resid`` and the log-partition ``lse = logsumexp(resid @ W_U + b_U)`` of each row.
        """
        expected_logit = (resid.double() * self.u).sum(dim=-1) + self.c
        return self.neg_entropy - expected_logit + lse.double()


@dataclass(frozen=True)
class ProbReference:
    """The reference distributions as fp32 probabilities, for KL(reference || q) of any logits in one
    pass over the vocabulary.

    With ``z`` a row of logits shifted by its maximum and ``log_s = log sum exp(z)``, so that
    ``log q = z - log_s``, per row::

        KL(p || q) = sum(p * lp) - sum(p * z) + log_s * sum(p)

    where every term is of the size of an entropy (the shift keeps ``z`` small where ``p`` is not),
    so fp32 suffices; ``sum(p)`` is the stored probabilities' own sum, so the identity is exact for
    them. Used where the logits are not exactly linear in a residual (low precision, soft-cap, an
    unembedding seen by hooks); :class:`LinearReference` is cheaper where they are.

    Attributes:
        p: the probabilities ``[n, d_vocab]`` (fp32).
        neg_entropy: ``sum_v p_v log p_v`` per row, in nats (float64).
        p_sum: ``sum_v p_v`` per row (float64).
        top1: the reference's top-1 token id per row.

    Example:
        >>> import torch
        >>> a, b = torch.randn(3, 10), torch.randn(3, 10)
        >>> ref = ProbReference.from_logits(a)
        >>> zb = b - b.amax(-1, keepdim=True)
        >>> kl = ref.kl_nats(zb, zb.logsumexp(-1))
        >>> bool(torch.allclose(kl.float(), kl_nats(log_probs(a), log_probs(b)), atol=1e-5))
        True
    """

    p: Float[Tensor, "n d_vocab"]
    neg_entropy: Float64[Tensor, " n"]
    p_sum: Float64[Tensor, " n"]
    top1: Int[Tensor, " n"]

    def __getitem__(self, rows: slice) -> ProbReference:
        return ProbReference(self.p[rows], self.neg_entropy[rows], self.p_sum[rows], self.top1[rows])

    def __len__(self) -> int:
        return self.top1.shape[0]

    @classmethod
    def from_logits(cls, logits: Float[Tensor, "n d_vocab"]) -> ProbReference:
        """The reference ``softmax(logits)`` (``logits`` is not modified)."""
        lp = log_probs(logits)
        p = lp.exp()
        return cls(p, (p.double() * lp.double()).sum(dim=-1), p.double().sum(dim=-1), lp.max(dim=-1).indices)

    @classmethod
    def cat(cls, parts: list[ProbReference]) -> ProbReference:
        """The rows of ``parts``, one after another."""
        return cls(*(torch.cat([getattr(r, f) for r in parts]) for f in ("p", "neg_entropy", "p_sum", "top1")))

    def kl_nats(self, shifted: Float[Tensor, "n d_vocab"], log_s: Float[Tensor, " n"]) -> Float64[Tensor, " n"]:
        """KL(reference || softmax(shifted)) in nats (float64), from logits ``shifted`` by their row
        maximum and their ``log_s = logsumexp(shifted)``.
        """
        dot = torch.bmm(self.p.unsqueeze(1), shifted.unsqueeze(2)).view(-1)  # sum(p * z) per row
        return self.neg_entropy - dot.double() + log_s.double() * self.p_sum


def logit_metrics(
    logits: Float[Tensor, "n d_vocab"],
    targets: Int[Tensor, " n"],
    ref: Float[Tensor, "n d_vocab"] | LinearReference | ProbReference | None = None,
    ref_top1: Int[Tensor, " n"] | None = None,
    *,
    resid: Float[Tensor, "n d_model"] | None = None,
    overwrite: bool = False,
    scratch: Float[Tensor, "m d_vocab"] | None = None,
    row_max: tuple[Float[Tensor, " n"], Int[Tensor, " n"]] | None = None,
) -> TokenMetrics:
    """:func:`distribution_metrics` of ``log_probs(logits)``, straight from the logits, in a few passes.

    Same keys and values (to fp32 rounding): ``loss``, ``entropy_bits`` (of the probabilities
    clamped at ``PROB_CLAMP``, as :func:`entropy_bits`), ``top1``, ``correct``, ``confidence``, and given a reference,
    ``kl_nats`` and ``agree``. The reference is its log-probabilities (the exact KL, as
    :func:`kl_nats`), a :class:`ProbReference` (the same KL in one pass), or a
    :class:`LinearReference`, in which case ``resid`` must be the input of
    the unembedding the logits were made from (``logits == resid @ W_U + b_U``, no soft-cap):
    the KL then costs a ``d_model`` dot product per row. ``agree`` compares with ``ref_top1``, else
    with the reference's own top-1.

    With ``overwrite=True`` the fp32 ``logits`` are used as a work buffer (their content is lost)
    instead of a copy. The exponentials are computed a group of rows at a time into a work buffer:
    ``scratch`` if given (any number of rows, overwritten; the group size is its row count), else
    one of :data:`ROWS_AT_ONCE` rows made for the call. ``row_max``, if the caller has it, is the
    value and index of each row's largest logit (the first one on ties, as ``Tensor.max(dim)``
    gives), which then is not searched for again.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
        >>> m = logit_metrics(logits, torch.tensor([0, 1]), ref=log_probs(logits))
        >>> m["top1"].tolist(), m["correct"].tolist(), m["kl_nats"].abs().max().item()
        ([0, 2], [True, False], 0.0)
        >>> d = distribution_metrics(log_probs(logits), torch.tensor([0, 1]))
        >>> all(torch.allclose(m[k].float(), d[k].float(), atol=1e-6) for k in d)
        True
    """
    n = logits.shape[0]
    if logits.dtype != torch.float32:
        z = logits.float()  # a new fp32 tensor: ours to overwrite
    elif overwrite:
        z = logits
    else:
        z = logits.clone()
    top, top1 = z.max(dim=-1) if row_max is None else row_max
    # the logit of the true next token is read before z is modified
    target_logit = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    exact_ref = ref is not None and not isinstance(ref, LinearReference | ProbReference)
    prob_ref = isinstance(ref, ProbReference)
    if isinstance(ref, LinearReference) and resid is None:
        raise ValueError("a LinearReference needs resid, the unembedding input the logits were made from")
    # The passes over the vocabulary go a group of rows at a time, so that the exponentials (and
    # the group's logits) stay in cache between passes.
    if scratch is not None and scratch.shape[0] < 1:
        raise ValueError("scratch must have at least one row")
    group = max(1, min(n, ROWS_AT_ONCE)) if scratch is None else scratch.shape[0]
    if scratch is None:
        scratch = z.new_empty((group, z.shape[1]))
    s = z.new_empty(n)
    ez = z.new_empty(n)
    es = z.new_empty(n)
    kl = z.new_empty(n) if exact_ref or prob_ref else None
    for start in range(0, n, group):
        rows = slice(start, min(start + group, n))
        zr = z[rows]
        zr.sub_(top[rows].unsqueeze(-1))  # logits - max <= 0
        e = torch.exp(zr, out=scratch[: rows.stop - rows.start])
        torch.sum(e, dim=-1, out=s[rows])  # >= 1
        log_s = s[rows].log().unsqueeze(-1)
        if prob_ref:
            kl[rows] = ref[rows].kl_nats(zr, log_s.squeeze(-1)).float()
        elif kl is not None:
            kl[rows] = kl_nats(ref[rows], zr - log_s)
        # the authors' entropy of the clamped probabilities: -sum q * log q, q = max(p, PROB_CLAMP),
        # p = e / s, lp = z - log s. With E = max(e, PROB_CLAMP * s) and Z = max(z, ln PROB_CLAMP + log s),
        # q = E / s and log q = Z - log s, so H = -(1/ln 2) * [sum E * Z / s - log s * sum E / s].
        torch.maximum(e, s[rows].unsqueeze(-1) * PROB_CLAMP, out=e)
        torch.sum(e, dim=-1, out=es[rows])
        zr.clamp_min_(log_s + _LOG_PROB_CLAMP)
        torch.sum(e.mul_(zr), dim=-1, out=ez[rows])
    log_s = s.log()
    lse = top.double() + log_s.double()
    if isinstance(ref, LinearReference):
        kl = ref.kl_nats(resid, lse).float()
        if ref_top1 is None:
            ref_top1 = ref.top1
    elif prob_ref and ref_top1 is None:
        ref_top1 = ref.top1
    elif ref is not None and ref_top1 is None:
        ref_top1 = ref.argmax(dim=-1)
    out: TokenMetrics = {
        "loss": (lse - target_logit.double()).float(),
        "entropy_bits": ((log_s.double() * es.double() - ez.double()) / s.double() / _LN2).float(),
        "top1": top1,
        "correct": top1 == targets,
        "confidence": s.reciprocal(),
    }
    if kl is not None:
        out["kl_nats"] = kl
    if ref_top1 is not None:
        out["agree"] = top1 == ref_top1
    return out


def stream_metrics(
    n_rows: int,
    logprobs_rows: Callable[[slice], Float[Tensor, "n d_vocab"]],
    targets: Int[Tensor, " n_rows"],
    ref_logprobs_rows: Callable[[slice], Float[Tensor, "n d_vocab"]] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> TokenMetrics:
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
    chunk_tokens = check_count(chunk_tokens, "chunk_tokens", "a positive number of token positions")
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
) -> TokenMetrics:
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
