"""How far a low-precision sweep's numbers are from fp32: the sweep measures its own error.

After a sweep in ``bf16`` or ``fp16`` (:mod:`stages_of_inference.precision`),
:func:`precision_check` re-runs a small fixed subset of its plans in fp32 on the first few
sequences, and compares them with the low-precision numbers of the same plans on the same
sequences (taken from the sweep's own per-sequence sums, not recomputed). The plans
(:func:`check_plan_ids`) are the unmodified model and the deletions and swaps nearest to relative
depths 0, 1/4, 1/2, 3/4 and 1: the two ends, where the damage is largest, and the middle, where
it is smallest and relative errors are largest.

Its verdict uses the targets the library holds a low precision to (:data:`CRITERIA`): the median
relative deviation of the plans' KL at most 1 %, every plan's KL within 0.05 nats or 1 % of
itself (whichever is larger: deleting block 0 costs about 7 nats of KL, and a few hundredths of a
nat there change no reading), and the rank correlation of the plans' KL at least 0.99.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from torch import Tensor

from stages_of_inference.interventions.executor import BatchResult, aggregate, iter_plan_batches
from stages_of_inference.interventions.options import EngineOptions
from stages_of_inference.interventions.plan import LayerPlan

__all__ = ["CHECK_DEPTHS", "CRITERIA", "PrecisionCheck", "check_plan_ids", "precision_check", "rank_correlation"]

CHECK_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Relative depths whose nearest deletion and swap the check re-runs in fp32."""

CRITERIA = {"kl_median_rel": 0.01, "kl_abs": 0.05, "kl_rel": 0.01, "kl_rank_correlation": 0.99}
"""The thresholds under which low-precision numbers can stand for fp32 ones: the median relative KL
deviation at most ``kl_median_rel``; each plan's KL deviation at most ``kl_abs`` nats or ``kl_rel``
of its fp32 KL, whichever is larger; the rank correlation at least ``kl_rank_correlation``."""


def rank_correlation(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman's rank correlation (ties get their mean rank); NaN for fewer than two values or a
    constant input.

    Example:
        >>> rank_correlation([0.1, 0.5, 0.3], [1.0, 9.0, 2.0]), rank_correlation([1, 2, 3], [3, 2, 1])
        (1.0, -1.0)
    """
    ra, rb = pd.Series(np.asarray(a, dtype=float)).rank(), pd.Series(np.asarray(b, dtype=float)).rank()
    if len(ra) < 2 or ra.nunique() < 2 or rb.nunique() < 2:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def check_plan_ids(kinds: Sequence[str], layers: Sequence[int | None]) -> list[int]:
    """Indexes of the plans the check re-runs, given each plan's kind and layer (``"none"`` and
    ``None`` for the unmodified model): the unmodified model, and per kind the plans nearest to
    each of :data:`CHECK_DEPTHS` (in order, without repeats).

    Example:
        >>> check_plan_ids(["none"] + ["drop"] * 9, [None] + list(range(9)))
        [0, 1, 3, 5, 7, 9]
    """
    chosen = [i for i, kind in enumerate(kinds) if kind == "none"][:1]
    for kind in dict.fromkeys(k for k in kinds if k != "none"):
        ids = [i for i, k in enumerate(kinds) if k == kind]
        for depth in CHECK_DEPTHS:
            pick = ids[round(depth * (len(ids) - 1))]
            if pick not in chosen:
                chosen.append(pick)
    return chosen


@dataclass(frozen=True)
class PrecisionCheck:
    """The deviations of a low-precision sweep from fp32.

    Attributes:
        table: one row per checked plan (the ``plan_ids`` order): ``plan_id``, ``kl_nats``,
            ``kl_nats_fp32``, ``loss``, ``loss_fp32``, ``accuracy``, ``accuracy_fp32`` (the low-precision
            value first), on the checked sequences.
        summary: ``precision``, ``n_sequences``, ``n_tokens``, ``n_plans``, ``kl_median_rel``,
            ``kl_max_abs``, ``kl_within_tolerance`` (every plan's KL within :data:`CRITERIA`'s
            ``kl_abs`` or ``kl_rel``), ``kl_rank_correlation``, ``loss_max_abs``,
            ``accuracy_max_abs``, ``criteria`` and ``stands`` (all criteria met).
    """

    table: pd.DataFrame
    summary: dict[str, Any]

    @property
    def sentence(self) -> str:
        """One line: whether the numbers can stand for fp32 ones, and the figures behind it."""
        s = self.summary
        verdict = "can stand for the paper's fp32 numbers" if s["stands"] else "cannot stand for the paper's fp32 numbers"
        sequences = f"{s['n_sequences']} sequence" + ("s" if s["n_sequences"] != 1 else "")
        return (f"The {s['precision']} numbers {verdict}: re-run in fp32 on {sequences}, "
                f"{s['n_plans']} plans' KL moved by a median {100 * s['kl_median_rel']:.2f} % and at most "
                f"{s['kl_max_abs']:.4f} nats (rank correlation {s['kl_rank_correlation']:.3f}); loss by at most "
                f"{s['loss_max_abs']:.4f} nats, accuracy by at most {s['accuracy_max_abs']:.4f}.")


def _subset(batches: Sequence[BatchResult], n_sequences: int, plan_ids: Sequence[int]) -> list[BatchResult]:
    """The batches' per-sequence sums of the first ``n_sequences`` sequences and of ``plan_ids``
    (renumbered ``0..``; the reference ``-1`` kept).
    """
    renumber = {pid: k for k, pid in enumerate(plan_ids)} | {-1: -1}
    out = []
    for b in batches:
        sums = b.sums[(b.sums["sequence"] < n_sequences) & b.sums["plan_id"].isin(list(renumber))].copy()
        if len(sums):
            sums["plan_id"] = sums["plan_id"].map(renumber)
            out.append(BatchResult(b.index, sums.reset_index(drop=True), None))
    return out


def precision_check(
    model: Any,
    tokens: Tensor,
    plans: Sequence[LayerPlan],
    plan_ids: Sequence[int],
    batches: Sequence[BatchResult],
    options: EngineOptions,
    n_sequences: int,
) -> PrecisionCheck:
    """Re-run ``plans[plan_ids]`` in fp32 on the first ``n_sequences`` sequences of ``tokens`` and
    compare them with the low-precision sweep that gave ``batches`` (with ``options``; its plan ids
    index ``plans``, all distinct).
    """
    chosen = [plans[i] for i in plan_ids]
    orders, n_layers = [p.order for p in chosen], chosen[0].n_layers
    fp32 = dataclasses.replace(options, precision="fp32", progress=False, per_token=False)
    exact = aggregate(orders, n_layers, list(iter_plan_batches(model, tokens[:n_sequences], chosen, fp32))).summary
    low = aggregate(orders, n_layers, _subset(batches, n_sequences, plan_ids)).summary
    table = pd.DataFrame({"plan_id": list(plan_ids), "label": low["label"]})
    for col in ("kl_nats", "loss", "accuracy"):
        table[col], table[f"{col}_fp32"] = low[col].to_numpy(), exact[col].to_numpy()
    damaged = table[table["kl_nats_fp32"] > 0]
    kl_dev = (damaged["kl_nats"] - damaged["kl_nats_fp32"]).abs()
    summary = {
        "precision": options.precision,
        "n_sequences": int(n_sequences),
        "n_tokens": int(exact["n_tokens"].iloc[0]),
        "n_plans": len(chosen),
        "kl_median_rel": float((kl_dev / damaged["kl_nats_fp32"]).median()) if len(damaged) else 0.0,
        "kl_max_abs": float((table["kl_nats"] - table["kl_nats_fp32"]).abs().max()),
        "kl_within_tolerance": bool(((table["kl_nats"] - table["kl_nats_fp32"]).abs()
                                     <= np.maximum(CRITERIA["kl_abs"], CRITERIA["kl_rel"] * table["kl_nats_fp32"])).all()),
        "kl_rank_correlation": rank_correlation(damaged["kl_nats"], damaged["kl_nats_fp32"]),
        "loss_max_abs": float((table["loss"] - table["loss_fp32"]).abs().max()),
        "accuracy_max_abs": float((table["accuracy"] - table["accuracy_fp32"]).abs().max()),
        "criteria": dict(CRITERIA),
    }
    summary["stands"] = bool(summary["kl_median_rel"] <= CRITERIA["kl_median_rel"] and summary["kl_within_tolerance"]
                             and summary["kl_rank_correlation"] >= CRITERIA["kl_rank_correlation"])
    return PrecisionCheck(table, summary)
