"""Stage 2, feature engineering: the logit-lens trajectory, layer similarity and linear probes.

In the middle of the network the residual stream is refined rather than read out: the paper's
logit lens stays near-uniform for the first half of the depth, neighbouring layers' hidden states
resemble each other (linear CKA), and linear probes find word-level features early (PAPER.md,
docs/stages/feature_engineering.md).

* :func:`logit_lens`: per readout (0 = embeddings ... ``n_layers`` = output), entropy in bits, KL to
  the final readout, accuracy, agreement with the final top-1 and confidence, in either lens
  convention (:mod:`stages_of_inference.lens`), streamed.
* :func:`prediction_depth`: for every token, the first lens readout from which the top-1 prediction
  stays the final one (beyond the paper); :func:`lens_with_depth` gives both from one pass.
* :func:`layer_similarity`: linear CKA (unbiased HSIC, accumulated over sequences) or mean cosine
  similarity between every pair of blocks' residual outputs.
* :func:`probe_layers`: a logistic-regression probe per readout for any per-token label, with the
  built-in labels :func:`continues_word` and :func:`next_starts_word`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities.activation_functions import softcap_enabled

from stages_of_inference._tl import HookedTransformer, Model
from stages_of_inference._utils import check_count, check_model, check_tokens, relative_depth
from stages_of_inference._utils import progress as _progress
from stages_of_inference.backends import as_seam
from stages_of_inference.batch import Tokens
from stages_of_inference.interventions.hooks import ResidualReadout, collect
from stages_of_inference.lens import Convention, check_convention, convention_name, convention_record, iter_lens
from stages_of_inference.metrics import (
    DEFAULT_CHUNK_TOKENS,
    ROWS_AT_ONCE,
    LinearReference,
    NonFiniteError,
    ProbReference,
    first_nonfinite,
    log_probs,
    logit_metrics,
    mean_and_sem,
)
from stages_of_inference.precision import check_precision
from stages_of_inference.probes import fit_probe
from stages_of_inference.results import provenance, with_provenance

__all__ = [
    "LABEL_MAKERS",
    "continues_word",
    "layer_similarity",
    "lens_tables",
    "lens_with_depth",
    "linear_cka",
    "logit_lens",
    "next_starts_word",
    "prediction_depth",
    "probe_layers",
    "unbiased_hsic",
]

# output column -> key of stages_of_inference.metrics.logit_metrics (= distribution_metrics)
_LENS_METRICS = {
    "entropy_bits": "entropy_bits",
    "kl_to_final_nats": "kl_nats",
    "accuracy": "correct",
    "agreement_with_final": "agree",
    "confidence": "confidence",
    "loss": "loss",
}


def _tiny_model(normalization_type: str = "LNPre") -> HookedTransformer:  # for docstring examples
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=16, d_head=4, d_vocab=11, act_fn="relu",
                                  normalization_type=normalization_type, seed=0)
    return HookedTransformer(cfg)


# --------------------------------------------------------------------------------------------
# logit lens


def logit_lens(
    model: Model,
    tokens: Tokens,
    convention: Convention = "paper",
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    points: Sequence[int] | None = None,
    precision: str = "fp32",
) -> pd.DataFrame:
    """The logit-lens trajectory: how each readout of the residual stream predicts the next token.

    Each readout (``layer`` 0 = embeddings, ``k`` = input of block ``k``, ``n_layers`` = output of
    the last block) is mapped to a distribution by the final norm and ``W_U`` without ``b_U``, in
    the named convention (:mod:`stages_of_inference.lens`; ``"paper"`` divides every readout by the
    final layer's norm scale, ``"per_layer_norm"`` normalises each with its own statistics). Over
    the scored positions ``1 .. pos - 2`` it reports, per readout, the mean over tokens and the
    standard error over sequences (``*_sem``) of:

    * ``entropy_bits``: entropy of the lens distribution, its probabilities clamped at 1e-9 first (the authors' formula);
    * ``kl_to_final_nats``: KL(final readout || this readout); the final readout is the lens'
      own last row, which is the model's output distribution when the model has no ``b_U``;
    * ``accuracy``: top-1 equals the true next token;
    * ``agreement_with_final``: top-1 equals the final readout's top-1;
    * ``confidence``: probability of the top-1 token;
    * ``loss``: cross-entropy of the true next token, in nats.

    Memory: one batch's d_model-wide readouts plus one chunk of vocabulary-wide numbers per readout
    (lens docstring). Time is dominated by ``(n_layers + 1)`` unembeddings per token.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids, BOS first, at least 3 positions.
        convention: ``"paper"``, ``"per_layer_norm"`` or a :class:`~stages_of_inference.tuned_lens.TunedLens`.
        batch_size: sequences per forward pass.
        chunk_tokens: token positions unembedded at once.
        progress: show a progress bar.
        points: readouts to report (default: all ``0 .. n_layers``); fewer points cost
            proportionally less, since unembedding dominates the time.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the dtype of the model's products and of
            the lens unembedding (:mod:`stages_of_inference.precision`); metrics stay fp32.

    Returns:
        One row per readout: ``layer``, ``relative_depth`` (``layer / n_layers``), the metrics above
        and their ``*_sem`` columns, ``convention``, ``n_tokens``; provenance in ``attrs``.

    Example:
        >>> import torch
        >>> m = _tiny_model()
        >>> df = logit_lens(m, torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0)), progress=False)
        >>> list(df["layer"]), float(df["kl_to_final_nats"].iloc[-1]), float(df["agreement_with_final"].iloc[-1])
        ([0, 1, 2], 0.0, 1.0)
    """
    model = check_model(model)
    source, tokens = tokens, check_tokens(model, tokens, min_len=3)
    check_convention(convention)
    pts = _check_points(points, model.cfg.n_layers + 1)
    settings = _LensSettings(convention, batch_size, chunk_tokens, progress, precision)
    return _lens_table(model, source, tokens, pts, settings, _lens_pass(model, tokens, pts, settings, depth=False))


@dataclass(frozen=True)
class _LensSettings:
    """How a lens pass runs (checked by the public functions that make it)."""

    convention: Convention
    batch_size: int
    chunk_tokens: int
    progress: bool
    precision: str

    def record(self) -> dict[str, Any]:
        """The settings a result's provenance records."""
        return {"convention": convention_record(self.convention), "batch_size": self.batch_size,
                "precision": self.precision}


@dataclass(frozen=True)
class _LensPass:
    """What one streamed lens pass gathered: per readout, metric and sequence the metric's sum over
    the sequence's scored positions (``[point, metric, sequence]``, float64); and where asked, per
    sequence the number of tokens whose prediction depth is each readout, for tokens the model
    gets right and wrong (``[sequence, n_points]`` each, float64).
    """

    sums: Tensor
    depth_right: Tensor | None = None
    depth_wrong: Tensor | None = None


def _lens_pass(model: Model, tokens: Tensor, pts: list[int], settings: _LensSettings,
               depth: bool) -> _LensPass:
    """Stream the lens over ``tokens``: the sums behind :func:`logit_lens` and, with ``depth``
    (every readout in ``pts``, in order), the prediction-depth counts behind :func:`prediction_depth`.
    """
    n_seq = tokens.shape[0]
    n_points = model.cfg.n_layers + 1
    final = n_points - 1
    columns = list(_LENS_METRICS)
    convention, precision = settings.convention, settings.precision
    with torch.inference_mode():
        sums = torch.zeros(len(pts), len(columns), n_seq, dtype=torch.float64)  # on the CPU (MPS has no float64)
        right = torch.zeros(n_seq, n_points, dtype=torch.float64) if depth else None
        wrong = torch.zeros(n_seq, n_points, dtype=torch.float64) if depth else None
        chunks = iter_lens(model, tokens, convention, batch_size=settings.batch_size, chunk_tokens=settings.chunk_tokens,
                           progress=settings.progress, precision=precision)
        # Lens logits are linear in the readout (readout @ W_U) unless the model soft-caps its
        # logits or they are rounded to a low precision; then the KL needs only a float64 summary
        # of the final readout's distribution per row (metrics.LinearReference), and logit_metrics
        # reduces each readout's logits in a few passes, reusing the logits as its work buffer.
        # Rounded logits take the reference's probabilities instead (metrics.ProbReference).
        w_u = as_seam(model).W_U.detach().float()
        rounded = check_precision(precision) != "fp32"
        linear = not softcap_enabled(getattr(model.cfg, "output_logits_soft_cap", None)) and not rounded
        scratch = torch.empty((ROWS_AT_ONCE, w_u.shape[1]), dtype=torch.float32, device=w_u.device)
        for chunk in chunks:
            final_logits = chunk.logits(final)
            if linear:
                ref: Tensor | LinearReference | ProbReference = LinearReference.from_logits(final_logits, w_u)
                ref_top1 = ref.top1
            elif rounded:
                ref = ProbReference.from_logits(final_logits)
                ref_top1 = ref.top1
            else:
                ref = log_probs(final_logits)
                ref_top1 = ref.argmax(dim=-1)
            settled = torch.zeros_like(chunk.targets)  # the readout from which the top-1 stays the final one
            for i, k in enumerate(pts):
                logits = final_logits if k == final else chunk.logits(k)
                m = logit_metrics(logits, chunk.targets, ref, ref_top1, resid=chunk.readouts[k].float(),
                                  overwrite=k != final, scratch=scratch)
                if k == final:  # the final readout against itself, exactly
                    m["kl_nats"] = torch.zeros_like(m["loss"])
                    m["agree"] = torch.ones_like(m["correct"])
                settled[~m["agree"]] = k + 1
                for j, col in enumerate(columns):
                    sums[i, j].index_add_(0, chunk.sequences.cpu(), m[_LENS_METRICS[col]].float().cpu().double())
                del logits, m
            if depth:
                hit = (ref_top1 == chunk.targets).cpu()
                cell = chunk.sequences.cpu() * n_points + settled.cpu()
                right.view(-1).index_add_(0, cell[hit], torch.ones(int(hit.sum()), dtype=torch.float64))
                wrong.view(-1).index_add_(0, cell[~hit], torch.ones(int((~hit).sum()), dtype=torch.float64))
            del final_logits, ref
    return _LensPass(sums, right, wrong)


def _lens_table(model: Model, source: Any, tokens: Tensor, pts: list[int], settings: _LensSettings,
                lens_pass: _LensPass) -> pd.DataFrame:
    """The :func:`logit_lens` table of one lens pass (refused if a readout is not finite)."""
    n_seq, pos = tokens.shape
    n_points = model.cfg.n_layers + 1
    columns = list(_LENS_METRICS)
    convention = convention_name(settings.convention)
    per_seq = lens_pass.sums / (pos - 2)
    if first_nonfinite(per_seq) is not None:
        # where the readouts themselves break: the columns that do not compare with the output's
        # readout (those break everywhere once the output does)
        own = [j for j, col in enumerate(columns) if "final" not in col]
        bad = first_nonfinite(per_seq[:, own])
        at = pts[bad] if bad is not None else pts[-1]
        why = ("; the paper convention divides every readout by the final layer's norm scale, so a non-finite "
               "output spoils every readout: the per_layer_norm convention shows where it starts"
               if convention == "paper" else "")
        raise NonFiniteError(
            f"the logit lens ({convention}) is NaN or infinite from readout {at} on (readout k is the residual "
            f"after block k - 1, 0 the embeddings): the model produces non-finite values there{why}; check its weights")

    rows = []
    for i, k in enumerate(pts):
        row: dict[str, Any] = {"layer": k, "relative_depth": relative_depth(k, n_points)}
        for j, col in enumerate(columns):
            mean, sem = mean_and_sem(per_seq[i, j].unsqueeze(1))
            row[col], row[f"{col}_sem"] = mean, sem
        row["convention"] = convention
        row["n_tokens"] = n_seq * (pos - 2)
        rows.append(row)
    df = pd.DataFrame(rows)
    record = provenance(model, source, analysis="logit_lens", **settings.record(), chunk_tokens=settings.chunk_tokens,
                        positions="1..pos-2", points=pts)
    return with_provenance(df, record)


def prediction_depth(
    model: Model,
    tokens: Tokens,
    convention: Convention = "paper",
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    precision: str = "fp32",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prediction depth (after Lioubashevski et al. 2024, arXiv:2410.20210): for every scored token,
    the first logit-lens readout from which the lens's top-1 token equals the final readout's top-1
    at every later readout ("saturation"); from one lens pass.

    A token's depth ``k`` runs from 0 (the embeddings already predict the final top-1, and every
    readout after them does too) to ``n_layers`` (only the output does). Tokens the model gets
    right are those whose final top-1 is the true next token.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids, BOS first, at least 3 positions.
        convention: ``"paper"``, ``"per_layer_norm"`` (:mod:`stages_of_inference.lens`) or a
            :class:`~stages_of_inference.tuned_lens.TunedLens`.
        batch_size: sequences per forward pass.
        chunk_tokens: token positions unembedded at once.
        progress: show a progress bar.
        precision: the dtype of the model's products and the lens unembedding
            (:mod:`stages_of_inference.precision`).

    Returns:
        ``(distribution, summary)``. ``distribution``: one row per readout ``layer`` (``0 ..
        n_layers``) with ``relative_depth`` (``layer / n_layers``), ``share`` (of all scored tokens
        whose depth is this readout), ``cumulative_share``, ``share_right`` and ``share_wrong``
        (the same among tokens the model gets right, and wrong), ``convention``. ``summary``: one
        row with ``convention``, ``mean_depth``, ``mean_depth_sem`` (over sequences),
        ``median_depth``, ``mean_depth_right``, ``mean_depth_wrong`` (in readouts),
        ``mean_relative_depth``, ``n_tokens``, ``n_right``. Provenance in both ``attrs``.

    Example:
        >>> import torch
        >>> dist, summary = prediction_depth(_tiny_model(), torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0)), progress=False)
        >>> list(dist["layer"]), round(float(dist["share"].sum()), 6), int(summary["n_tokens"].iloc[0])
        ([0, 1, 2], 1.0, 12)
    """
    settings = _LensSettings(convention, batch_size, chunk_tokens, progress, precision)
    model, source, _, _, lens_pass = _depth_pass(model, tokens, settings)
    return _depth_tables(model, source, settings, lens_pass)


def lens_with_depth(
    model: Model,
    tokens: Tokens,
    convention: Convention = "paper",
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    precision: str = "fp32",
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """:func:`logit_lens` and :func:`prediction_depth` (same arguments) from one lens pass:
    ``(lens, depth distribution, depth summary)``, the same tables as the two calls give.

    Example:
        >>> import torch
        >>> lens, dist, summary = lens_with_depth(_tiny_model(), torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0)), progress=False)
        >>> len(lens) == len(dist) == 3, len(summary)
        (True, 1)
    """
    tables = lens_tables(model, tokens, convention, batch_size, chunk_tokens, progress, precision)
    return tables["lens"], tables["depth"], tables["depth_summary"]


def lens_tables(
    model: Model,
    tokens: Tokens,
    convention: Convention = "paper",
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    precision: str = "fp32",
) -> dict[str, pd.DataFrame]:
    """:func:`lens_with_depth`'s three tables (``lens``, ``depth``, ``depth_summary``) and the
    same pass's ``per_sequence`` table, the additive parts a bootstrap over sequences resamples:
    per ``sequence`` and readout ``layer``, the mean over the sequence's scored tokens of every
    lens metric (``entropy_bits``, ``kl_to_final_nats``, ...), and how many of its tokens have
    their prediction depth at that readout (``depth_right``, ``depth_wrong``); ``convention``.

    Example:
        >>> import torch
        >>> t = lens_tables(_tiny_model(), torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0)), progress=False)
        >>> per = t["per_sequence"]
        >>> len(per), int(per["depth_right"].sum() + per["depth_wrong"].sum()) == int(t["depth_summary"]["n_tokens"].iloc[0])
        (6, True)
    """
    settings = _LensSettings(convention, batch_size, chunk_tokens, progress, precision)
    model, source, tokens, pts, lens_pass = _depth_pass(model, tokens, settings)
    lens = _lens_table(model, source, tokens, pts, settings, lens_pass)
    depth, summary = _depth_tables(model, source, settings, lens_pass)
    per_seq = (lens_pass.sums / (tokens.shape[1] - 2)).numpy()  # [point, metric, sequence]
    n_seq = tokens.shape[0]
    rows = pd.DataFrame({"sequence": np.repeat(np.arange(n_seq), len(pts)), "layer": np.tile(pts, n_seq)})
    for j, col in enumerate(_LENS_METRICS):
        rows[col] = per_seq[:, j, :].T.reshape(-1)
    rows["depth_right"] = lens_pass.depth_right[:, pts].numpy().reshape(-1)
    rows["depth_wrong"] = lens_pass.depth_wrong[:, pts].numpy().reshape(-1)
    rows["convention"] = convention_name(convention)
    record = dict(lens.attrs["provenance"], analysis="logit_lens (per sequence)")
    return {"lens": lens, "depth": depth, "depth_summary": summary, "per_sequence": with_provenance(rows, record)}


def _depth_pass(model: Model, tokens: Tokens,
                settings: _LensSettings) -> tuple[Model, Any, Tensor, list[int], _LensPass]:
    """Check the inputs and run a lens pass over every readout that counts prediction depths:
    the checked model, the tokens as given (for provenance) and as a tensor, the readouts, the pass.
    """
    model = check_model(model)
    source, tokens = tokens, check_tokens(model, tokens, min_len=3)
    check_convention(settings.convention)
    pts = list(range(model.cfg.n_layers + 1))
    return model, source, tokens, pts, _lens_pass(model, tokens, pts, settings, depth=True)


def _depth_tables(model: Model, source: Any, settings: _LensSettings,
                  lens_pass: _LensPass) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two :func:`prediction_depth` tables of a lens pass that counted depths."""
    right, wrong = lens_pass.depth_right, lens_pass.depth_wrong
    n_points = right.shape[1]
    convention = convention_name(settings.convention)
    both = right + wrong
    readouts = torch.arange(n_points, dtype=torch.float64)
    total, n_right, n_wrong = float(both.sum()), float(right.sum()), float(wrong.sum())

    def share(counts: Tensor, n: float) -> list[float]:
        return (counts.sum(dim=0) / n).tolist() if n > 0 else [float("nan")] * n_points

    dist = pd.DataFrame({
        "layer": range(n_points),
        "relative_depth": [relative_depth(k, n_points) for k in range(n_points)],
        "share": share(both, total),
        "share_right": share(right, n_right),
        "share_wrong": share(wrong, n_wrong),
        "convention": convention,
    })
    dist.insert(3, "cumulative_share", dist["share"].cumsum())
    per_seq = (both * readouts).sum(dim=1) / both.sum(dim=1).clamp_min(1)
    cdf = torch.cumsum(both.sum(dim=0), 0) / total
    mean = float((both.sum(dim=0) * readouts).sum() / total)
    summary = pd.DataFrame([{
        "convention": convention,
        "mean_depth": mean,
        "mean_depth_sem": float(per_seq.std() / len(per_seq) ** 0.5) if len(per_seq) > 1 else 0.0,
        "median_depth": int((cdf >= 0.5).nonzero()[0, 0]),
        "mean_depth_right": float((right.sum(dim=0) * readouts).sum() / n_right) if n_right else float("nan"),
        "mean_depth_wrong": float((wrong.sum(dim=0) * readouts).sum() / n_wrong) if n_wrong else float("nan"),
        "mean_relative_depth": mean / (n_points - 1),
        "n_tokens": int(total),
        "n_right": int(n_right),
    }])
    record = provenance(model, source, analysis="prediction_depth", **settings.record(), positions="1..pos-2",
                        definition="first lens readout from which the top-1 equals the final readout's at every later one")
    return with_provenance(dist, record), with_provenance(summary, dict(record))


def _check_points(points: Sequence[int] | None, n_points: int) -> list[int]:
    if points is None:
        return list(range(n_points))
    pts = sorted({int(p) for p in points})
    if not pts:
        raise ValueError(f"points is empty: name readouts in 0 (embeddings) .. {n_points - 1} (output)")
    for p in pts:
        if not 0 <= p < n_points:
            raise ValueError(f"readout point {p} out of range: 0 (embeddings) .. {n_points - 1} (output)")
    return pts


# --------------------------------------------------------------------------------------------
# layer similarity


def unbiased_hsic(
    gram_a: Float[Tensor, "*batch n n"], gram_b: Float[Tensor, "*batch n n"]
) -> Float[Tensor, "*batch"]:
    """The unbiased HSIC estimator (Song et al. 2012) of two kernel matrices (float64).

    ``HSIC = [tr(K L) + 1'K1 1'L1 / ((n-1)(n-2)) - 2/(n-2) 1'K L1] / (n (n-3))`` with both
    kernels' diagonals set to zero. Needs ``n >= 4``. Invariant to translating the features of a
    linear kernel, so no centring is needed.

    Example:
        >>> import torch
        >>> x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> k = x @ x.T
        >>> bool(torch.isclose(unbiased_hsic(k, k), unbiased_hsic(k + 0, (x + 5) @ (x + 5).T)))
        True
    """
    if gram_a.shape != gram_b.shape:
        raise ValueError(f"kernel matrices differ in shape: {tuple(gram_a.shape)} vs {tuple(gram_b.shape)}")
    n = gram_a.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 samples, got {n}")
    k = _zero_diagonal(gram_a.double())
    l = _zero_diagonal(gram_b.double())
    trace = (k * l).sum(dim=(-2, -1))
    ks, ls = k.sum(dim=(-2, -1)), l.sum(dim=(-2, -1))
    cross = (k.sum(dim=-1) * l.sum(dim=-1)).sum(dim=-1)
    return (trace + ks * ls / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def linear_cka(
    features_a: Float[Tensor, "batch n d_a"], features_b: Float[Tensor, "batch n d_b"]
) -> float:
    """Linear CKA of two representations of the same ``batch`` sequences of ``n`` tokens.

    The unbiased HSIC of the linear kernels is summed over sequences before the ratio
    ``HSIC(a, b) / sqrt(HSIC(a, a) HSIC(b, b))``, as :func:`layer_similarity` does.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(0))
        >>> round(linear_cka(x, 3 * x), 6), round(linear_cka(x, x @ torch.linalg.qr(torch.randn(4, 4))[0]), 6)
        (1.0, 1.0)
    """
    if features_a.shape[:2] != features_b.shape[:2]:
        raise ValueError(
            f"representations must cover the same [batch, n] tokens, got {tuple(features_a.shape[:2])} "
            f"and {tuple(features_b.shape[:2])}"
        )
    a, b = features_a.double(), features_b.double()
    ka, kb = a @ a.transpose(-1, -2), b @ b.transpose(-1, -2)
    hab = unbiased_hsic(ka, kb).sum()
    haa, hbb = unbiased_hsic(ka, ka).sum(), unbiased_hsic(kb, kb).sum()
    return float(hab / torch.sqrt(haa * hbb))


def _float64_device(device: torch.device) -> torch.device:
    """Where float64 work happens: the tokens' device, or the CPU on MPS (which has no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


def _zero_diagonal(gram: Tensor) -> Tensor:
    return gram * (1 - torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device))


def _pairwise_unbiased_hsic(grams: Float[Tensor, "layer batch n n"]) -> Float[Tensor, "layer layer"]:
    """Sum over the batch of the unbiased HSIC of every pair of layers' kernels."""
    n = grams.shape[-1]
    k = _zero_diagonal(grams)
    flat = k.flatten(-2)  # [layer, batch, n*n]
    trace = torch.einsum("ibx,jbx->bij", flat, flat)
    sums = flat.sum(-1)  # [layer, batch]
    rows = k.sum(-1)  # [layer, batch, n]
    cross = torch.einsum("ibp,jbp->bij", rows, rows)
    outer = torch.einsum("ib,jb->bij", sums, sums)
    hsic = (trace + outer / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))
    return hsic.sum(0)


def layer_similarity(
    model: Model,
    tokens: Tokens,
    method: str = "cka",
    batch_size: int = 8,
    progress: bool = True,
    outlier_ratio: float | None = None,
    precision: str = "fp32",
) -> pd.DataFrame:
    """Similarity between every pair of blocks' residual outputs (``blocks.i.hook_resid_post``).

    * ``"cka"``: linear CKA with the unbiased HSIC estimator (:func:`unbiased_hsic`, kernel
      diagonals zeroed): per sequence, the linear kernel ``X X'`` over its positions; HSIC of every
      pair of layers is summed over sequences and only then turned into
      ``CKA(i, j) = HSIC(i, j) / sqrt(HSIC(i, i) HSIC(j, j))``.
    * ``"cosine"``: the mean, over tokens, of the cosine similarity between the same token's
      residual vectors after blocks ``i`` and ``j``.

    Positions ``1 .. pos - 1`` are used: the BOS position is left out, because its residual (an
    attention sink, with a far larger norm) would dominate the kernels. Memory: per batch, one
    ``pos x pos`` kernel (CKA) or one ``pos x d_model`` block of unit vectors (cosine) per layer.

    Other tokens can carry massive activations too (on SmolLM2, some ``" the"`` tokens reach 8x the
    median residual norm in blocks 2-9), and a linear kernel is then dominated by them.
    ``outlier_ratio`` (e.g. 4.0) leaves out, from every layer's kernel or mean, each token whose
    residual norm after *any* block exceeds ``outlier_ratio`` times the median norm of its sequence
    after that block. The default (``None``) keeps every token but BOS, as the paper's definition.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids, BOS first; CKA needs at least 5 positions.
        method: ``"cka"`` or ``"cosine"``.
        batch_size: sequences per forward pass.
        progress: show a progress bar.
        outlier_ratio: leave out tokens with massive activations (above), or ``None``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the dtype of the model's products
            (:mod:`stages_of_inference.precision`); the statistics stay fp32 or wider.

    Returns:
        The matrix in long form, one row per ordered pair of blocks: ``layer_a``, ``layer_b``,
        ``relative_depth_a``, ``relative_depth_b`` (``i / (n_layers - 1)``), ``similarity``,
        ``method``. For the square matrix:
        ``df.pivot(index="layer_a", columns="layer_b", values="similarity")``.

    Example:
        >>> import torch
        >>> m = _tiny_model()
        >>> df = layer_similarity(m, torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0)), progress=False)
        >>> len(df), round(float(df.query("layer_a == layer_b")["similarity"].min()), 6)
        (4, 1.0)
    """
    model = check_model(model)
    if method not in ("cka", "cosine"):
        raise ValueError(f"unknown similarity method {method!r}; allowed: 'cka', 'cosine'")
    source, tokens = tokens, check_tokens(model, tokens, min_len=5 if method == "cka" else 2)
    batch_size = check_count(batch_size, "batch_size", "a positive number of sequences")
    if outlier_ratio is not None and not outlier_ratio > 1.0:
        raise ValueError(f"outlier_ratio must be above 1 (a multiple of the median norm) or None, got {outlier_ratio}")
    n_layers = model.cfg.n_layers
    points = list(range(1, n_layers + 1))  # readout k = output of block k - 1
    work = _float64_device(tokens.device)
    total = torch.zeros(n_layers, n_layers, dtype=torch.float64, device=work)
    n_used = 0
    with torch.inference_mode():
        for start in _progress(range(0, tokens.shape[0], batch_size), progress, desc=f"layer similarity ({method})"):
            batch = tokens[start : start + batch_size]
            store: dict[int, Tensor] = {}

            def reduce(point: int, resid: Tensor) -> None:
                x = resid[:, 1:].float().to(work).double()
                if outlier_ratio is not None:
                    store[point] = x  # kept whole until the outliers of every layer are known
                elif method == "cka":
                    store[point] = x @ x.transpose(-1, -2)
                else:
                    store[point] = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

            collect(model, batch, [ResidualReadout(reduce, points)], batch_size=batch.shape[0], progress=False,
                    precision=precision)
            stack = torch.stack([store.pop(p) for p in points])
            if outlier_ratio is None:
                n_used += batch.shape[0] * (batch.shape[1] - 1)
                if method == "cka":
                    total += _pairwise_unbiased_hsic(stack)
                else:
                    total += torch.einsum("ibpd,jbpd->ij", stack, stack)
            else:
                norms = stack.norm(dim=-1)  # [layer, batch, n]
                keep = ~(norms > outlier_ratio * norms.median(dim=-1, keepdim=True).values).any(dim=0)
                for b in range(batch.shape[0]):
                    x = stack[:, b, keep[b]]  # [layer, n_kept, d_model]
                    if method == "cka":
                        if x.shape[1] < 4:
                            raise ValueError(f"sequence {start + b} keeps {x.shape[1]} tokens after outlier removal; CKA needs 4")
                        total += _pairwise_unbiased_hsic((x @ x.transpose(-1, -2)).unsqueeze(1))
                    else:
                        u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                        total += torch.einsum("ipd,jpd->ij", u, u)
                    n_used += x.shape[1]
            del stack
        if method == "cka":
            diag = total.diagonal().clamp_min(1e-300)
            matrix = total / torch.sqrt(diag[:, None] * diag[None, :])
        else:
            matrix = total / max(n_used, 1)
        n_excluded = tokens.shape[0] * (tokens.shape[1] - 1) - n_used
    rows = [
        {
            "layer_a": i,
            "layer_b": j,
            "relative_depth_a": relative_depth(i, n_layers),
            "relative_depth_b": relative_depth(j, n_layers),
            "similarity": float(matrix[i, j]),
            "method": method,
        }
        for i in range(n_layers)
        for j in range(n_layers)
    ]
    record = provenance(model, source, analysis="layer_similarity", method=method, batch_size=batch_size,
                        positions="1..pos-1", hook="blocks.{i}.hook_resid_post", outlier_ratio=outlier_ratio,
                        excluded_tokens=n_excluded, precision=precision)
    return with_provenance(pd.DataFrame(rows), record)


# --------------------------------------------------------------------------------------------
# probes and labels

_SPACE_MARKERS = ("Ġ", "▁", "Ċ", "ĉ", " ", "\n", "\t", "\r")


def _token_pieces(model: Model, tokens: Tensor) -> tuple[list[list[str]], set[int]]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            "word-boundary labels come from the tokenizer's token strings, but this model has no "
            "tokenizer; pass labels as an integer tensor [batch, pos] instead (-1 = ignore)"
        )
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces = [list(tokenizer.convert_ids_to_tokens([int(t) for t in row])) for row in tokens.tolist()]
    return pieces, special


def _starts_with_space(piece: str) -> bool:
    return piece.startswith(_SPACE_MARKERS)


def _starts_wordlike(piece: str) -> bool:
    return bool(piece) and piece[0].isalnum()


def _ends_wordlike(piece: str) -> bool:
    return bool(piece) and piece[-1].isalnum()


def continues_word(model: Model, tokens: Tokens) -> Int[Tensor, "batch pos"]:
    """Label 1 where a token continues a word begun by an earlier token, else 0 (-1 at position 0).

    From the tokenizer's token strings (``convert_ids_to_tokens``): a token continues a word when
    it has no leading-space marker (``Ġ``, ``▁``, a space or a newline), begins with a letter or
    digit, and the previous token (not a special token) ends with a letter or digit, as ``"ing"``
    after ``"walk"``. Position 0 (BOS) is not labelled.

    Raises:
        ValueError: if the model has no tokenizer.

    Example:
        >>> import torch
        >>> from tokenizers import Tokenizer, models
        >>> from transformers import PreTrainedTokenizerFast
        >>> vocab = {w: i for i, w in enumerate(["<s>", "Ġwalk", "ing", "Ġhome", ","])}
        >>> tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<s>")), bos_token="<s>")
        >>> m = _tiny_model(); m.tokenizer = tok
        >>> continues_word(m, torch.tensor([[0, 1, 2, 3, 4]])).tolist()
        [[-1, 0, 1, 0, 0]]
    """
    check_model(model)
    pieces, special = _token_pieces(model, tokens)
    out = torch.zeros(tokens.shape, dtype=torch.long)
    for b, row in enumerate(pieces):
        ids = tokens[b].tolist()
        out[b, 0] = -1
        for t in range(1, len(row)):
            prev_ok = ids[t - 1] not in special and _ends_wordlike(row[t - 1])
            here_ok = ids[t] not in special and not _starts_with_space(row[t]) and _starts_wordlike(row[t])
            out[b, t] = int(prev_ok and here_ok)
    return out.to(tokens.device)


def next_starts_word(model: Model, tokens: Tokens) -> Int[Tensor, "batch pos"]:
    """Label 1 where the *next* token starts a new word, else 0 (-1 at position 0 and the last position).

    A token starts a new word when its string (``convert_ids_to_tokens``) has a leading-space
    marker (``Ġ``, ``▁``, a space or a newline) followed by a letter or digit. Punctuation and word
    continuations are 0. Labels position ``t`` by token ``t + 1``: a probe on the residual at ``t``
    asks whether the model already knows that the current word ends here.

    Raises:
        ValueError: if the model has no tokenizer.

    Example:
        >>> import torch
        >>> from tokenizers import Tokenizer, models
        >>> from transformers import PreTrainedTokenizerFast
        >>> vocab = {w: i for i, w in enumerate(["<s>", "Ġwalk", "ing", "Ġhome", ","])}
        >>> tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<s>")), bos_token="<s>")
        >>> m = _tiny_model(); m.tokenizer = tok
        >>> next_starts_word(m, torch.tensor([[0, 1, 2, 3, 4]])).tolist()
        [[-1, 0, 1, 0, -1]]
    """
    check_model(model)
    pieces, special = _token_pieces(model, tokens)
    out = torch.zeros(tokens.shape, dtype=torch.long)
    for b, row in enumerate(pieces):
        ids = tokens[b].tolist()
        out[b, 0] = -1
        out[b, -1] = -1
        for t in range(1, len(row) - 1):
            nxt = row[t + 1]
            starts = ids[t + 1] not in special and _starts_with_space(nxt) and _starts_wordlike(nxt.lstrip("".join(_SPACE_MARKERS)))
            out[b, t] = int(starts)
    return out.to(tokens.device)


LABEL_MAKERS: dict[str, Callable[[Model, Tensor], Tensor]] = {
    "continues_word": continues_word,
    "next_starts_word": next_starts_word,
}
"""Built-in per-token labels for :func:`probe_layers`, by name."""


def probe_layers(
    model: Model,
    tokens: Tokens,
    labels: Int[Tensor, "batch pos"] | str | Callable[[Model, Tensor], Tensor],
    *,
    points: Sequence[int] | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float = 1e-2,
    max_iter: int = 200,
    batch_size: int = 8,
    progress: bool = True,
    precision: str = "fp32",
) -> pd.DataFrame:
    """A linear probe per residual readout for a per-token label; held-out accuracy vs the majority baseline.

    Features are the residual stream at each readout (``layer`` 0 = embeddings ... ``n_layers`` =
    output of the last block) at every labelled position; each readout gets its own
    :func:`stages_of_inference.probes.fit_probe`, with the same seeded train/test split of tokens
    for every readout. Features of all labelled tokens at all readouts are kept in memory
    (``(n_layers + 1) x n_labelled x d_model`` fp32 numbers).

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids.
        labels: an integer tensor ``[batch, pos]`` (negative = not labelled), the name of a
            built-in label maker (:data:`LABEL_MAKERS`: ``"continues_word"``,
            ``"next_starts_word"``) or any callable ``(model, tokens) -> labels``.
        points: readouts to probe (default: all).
        test_fraction: the held-out share (:func:`~stages_of_inference.probes.fit_probe`).
        seed: the seed of the split.
        l2: the probes' L2 penalty.
        max_iter: the most optimiser iterations per probe.
        batch_size: sequences per forward pass.
        progress: show a progress bar.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the dtype of the model's products
            (:mod:`stages_of_inference.precision`); the statistics stay fp32 or wider.

    Returns:
        One row per readout: ``layer``, ``relative_depth`` (``layer / n_layers``), ``accuracy``
        (held out), ``baseline`` (majority class), ``gain``, ``train_accuracy``, ``n_train``,
        ``n_test``, ``label``; provenance in ``attrs``.

    Example:
        >>> import torch
        >>> m = _tiny_model()
        >>> tokens = torch.randint(0, 11, (4, 16), generator=torch.Generator().manual_seed(0))
        >>> df = probe_layers(m, tokens, (tokens % 2 == 0).long(), progress=False)
        >>> list(df["layer"]), list(df.columns[2:5])
        ([0, 1, 2], ['accuracy', 'baseline', 'gain'])
    """
    model = check_model(model)
    source, tokens = tokens, check_tokens(model, tokens, min_len=1)
    if isinstance(labels, str):
        if labels not in LABEL_MAKERS:
            raise ValueError(f"unknown label maker {labels!r}; built in: {', '.join(LABEL_MAKERS)}")
        label_name = labels
        labels = LABEL_MAKERS[labels](model, tokens)
    elif callable(labels) and not isinstance(labels, torch.Tensor):
        label_name = getattr(labels, "__name__", "custom")
        labels = labels(model, tokens)
    else:
        label_name = "custom"
    if not isinstance(labels, torch.Tensor) or labels.shape != tokens.shape:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor shaped like tokens {tuple(tokens.shape)}, got {got}")
    if labels.dtype.is_floating_point:
        raise TypeError(f"labels must be integers (negative = not labelled), got dtype {labels.dtype}")
    labels = labels.to(tokens.device).long()
    mask = labels >= 0
    if int(mask.sum()) < 4:
        raise ValueError(f"only {int(mask.sum())} labelled positions; a probe needs at least 4")
    if labels[mask].unique().numel() < 2:
        raise ValueError(f"every labelled position has the same label ({int(labels[mask][0])}); a probe needs two classes")
    n_points = model.cfg.n_layers + 1
    pts = _check_points(points, n_points)

    feats: dict[int, list[Tensor]] = {p: [] for p in pts}
    with torch.inference_mode():
        for start in _progress(range(0, tokens.shape[0], batch_size), progress, desc="probe features"):
            batch = tokens[start : start + batch_size]
            batch_mask = mask[start : start + batch_size]

            def reduce(point: int, resid: Tensor) -> None:
                feats[point].append(resid[batch_mask].float())

            collect(model, batch, [ResidualReadout(reduce, pts)], batch_size=batch.shape[0], progress=False,
                    precision=precision)
    y = labels[mask]
    rows = []
    for p in _progress(pts, progress, desc="probes"):
        x = torch.cat(feats.pop(p))
        r = fit_probe(x, y, test_fraction=test_fraction, seed=seed, l2=l2, max_iter=max_iter)
        rows.append({
            "layer": p,
            "relative_depth": relative_depth(p, n_points),
            "accuracy": r.accuracy,
            "baseline": r.baseline,
            "gain": r.gain,
            "train_accuracy": r.train_accuracy,
            "n_train": r.n_train,
            "n_test": r.n_test,
            "label": label_name,
        })
    record = provenance(model, source, analysis="probe_layers", label=label_name, test_fraction=test_fraction,
                        seed=seed, l2=l2, max_iter=max_iter, precision=precision)
    return with_provenance(pd.DataFrame(rows), record)
