"""How sure is each boundary: a bootstrap over sequences of the stage rule and the signals.

The stage rule (:func:`~stages_of_inference.stages.placement.place_stages`) and the signals beside
it read means over a batch of sequences. :func:`boundary_intervals` resamples the sequences with
replacement, recomputes every mean from the per-sequence values the analyses already keep (no
second forward pass), places the boundaries again, and reports the interval that holds the middle
``level`` of the resampled boundaries. Inputs read from different token batches (the main batch,
the heavy batch) are resampled independently, each over its own sequences; inputs with the same
number of sequences share one draw (in a study they are then the same sequences: the heavy batch
is the first sequences of the main one).

What is resampled (:class:`PerSequence`): the deletion KL of each block (the sweep's per-token
table), the paper-convention lens entropy, previous-token attention, the prediction-depth counts,
and the first token's norm and the matrix entropy (Mix-Compress-Refine's phases). The neuron counts
come from the weights and do not vary. The sink and sublayer signals keep their point estimates
(their per-sequence values are not kept: a maximum over the batch and a second sweep).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from stages_of_inference.stages.competing import phase_starts
from stages_of_inference.stages.placement import STAGES, neuron_count_array, stage_starts

__all__ = ["LEVEL", "PerSequence", "boundary_intervals"]

LEVEL = 0.9
"""The coverage of the intervals."""


@dataclass(frozen=True)
class PerSequence:
    """Per-sequence values, ``[sequence, block]`` or ``[sequence, readout]`` arrays; any may be
    ``None`` (not measured).

    Attributes:
        drop_kl: mean KL of deleting each block, over the sequence's scored tokens.
        lens_entropy: the paper-convention logit-lens entropy (bits) at each readout.
        attention: previous-token attention of each block.
        depth_counts: tokens whose prediction depth is each readout.
        bos_norm: the first token's residual norm at each readout.
        matrix_entropy: the normalised matrix-based entropy at each readout.
    """

    drop_kl: np.ndarray | None = None
    lens_entropy: np.ndarray | None = None
    attention: np.ndarray | None = None
    depth_counts: np.ndarray | None = None
    bos_norm: np.ndarray | None = None
    matrix_entropy: np.ndarray | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, np.ndarray) or value.ndim != 2 or len(value) < 2):
                raise ValueError(f"PerSequence.{f.name} must be a [sequence, layer] array of at least 2 sequences")
        if (self.bos_norm is None) != (self.matrix_entropy is None):
            raise ValueError("PerSequence needs bos_norm and matrix_entropy together (the phases read both)")

    def resampled(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Each array's mean over a resample of its sequences (one draw per batch size, so inputs
        from the same batch share it).
        """
        draws: dict[int, np.ndarray] = {}
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            n = len(value)
            if n not in draws:
                draws[n] = rng.integers(0, n, n)
            out[f.name] = value[draws[n]].mean(axis=0) if f.name != "depth_counts" else value[draws[n]].sum(axis=0)
        return out

    def means(self) -> dict[str, np.ndarray]:
        """Each array's mean over all its sequences (the point estimate)."""
        return {f.name: (v.sum(axis=0) if f.name == "depth_counts" else v.mean(axis=0))
                for f in fields(self) if (v := getattr(self, f.name)) is not None}


def _boundaries(values: dict[str, np.ndarray], counts: np.ndarray | None, n_layers: int) -> dict[str, int]:
    """Every boundary the values give: the rule's three (``counts``: the fixed neuron counts,
    :func:`~stages_of_inference.stages.placement.neuron_count_array`) and the resampled signals'.
    """
    blocks = np.arange(n_layers)
    kl, entropy, attention = values.get("drop_kl"), values.get("lens_entropy"), values.get("attention")
    out: dict[str, int] = {}
    if kl is not None or entropy is not None or attention is not None or counts is not None:
        starts = stage_starts(n_layers, kl=None if kl is None else (blocks, kl), entropy=entropy,
                              attention=None if attention is None else (blocks, attention), counts=counts)
        (b, _), (c, _), (d, _) = starts
        # a stage squeezed to no block has no first block (-1), as in place_stages' table
        out.update({f"rule: {STAGES[1]}": b if c > b else -1, f"rule: {STAGES[2]}": c if d > c else -1,
                    f"rule: {STAGES[3]}": d})
    if "depth_counts" in values:
        depth = values["depth_counts"]
        cdf = np.cumsum(depth) / max(float(depth.sum()), 1e-12)
        out["half the predictions have settled"] = max(int(np.nonzero(cdf >= 0.5)[0][0]) - 1, 0)
    if "bos_norm" in values:
        compress, refine = phase_starts(values["bos_norm"], values["matrix_entropy"])
        out["compression begins (the first token's norm jumps)"] = compress
        out["the compression valley ends (the entropy recovers)"] = refine
    return out


def boundary_intervals(
    samples: PerSequence,
    n_layers: int,
    *,
    neurons: pd.DataFrame | None = None,
    resamples: int = 200,
    seed: int = 0,
    level: float = LEVEL,
) -> pd.DataFrame:
    """The stage rule's boundaries and the resampled signals', each with a bootstrap interval.

    Args:
        samples: the per-sequence values (:class:`PerSequence`).
        n_layers: the model's number of blocks.
        neurons: the neuron counts the rule reads (fixed: they come from the weights), or ``None``.
        resamples: how many resamples (at least 10).
        seed: the resampling's seed (the same seed gives the same intervals).
        level: the coverage, in (0, 1).

    Returns:
        One row per boundary: ``boundary`` (``"rule: <stage>"`` for the first block of a stage
        the rule places, else the signal's name), ``layer`` (from all sequences), ``low`` and
        ``high`` (the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled
        boundaries, as blocks; a boundary that never fires is -1), ``relative_depth``,
        ``relative_low``, ``relative_high`` (block / (n_layers - 1)), ``resamples``, ``level``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> kl = np.array([8, .3, .2, .2, .1, .1, .2, .3, .5, 2]) * rng.uniform(.8, 1.2, (6, 10))
        >>> out = boundary_intervals(PerSequence(drop_kl=kl), 10, resamples=50)
        >>> out["boundary"].tolist()
        ['rule: feature engineering', 'rule: prediction ensembling', 'rule: residual sharpening']
        >>> bool((out["low"] <= out["layer"]).all() and (out["layer"] <= out["high"]).all())
        True
    """
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 10:
        raise ValueError(f"resamples must be a whole number of at least 10, got {resamples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    counts = None if neurons is None else neuron_count_array(neurons, n_layers)
    point = _boundaries(samples.means(), counts, n_layers)
    rng = np.random.default_rng(seed)
    drawn: dict[str, list[int]] = {name: [] for name in point}
    for _ in range(int(resamples)):
        for name, layer in _boundaries(samples.resampled(rng), counts, n_layers).items():
            drawn[name].append(layer)
    scale = max(n_layers - 1, 1)
    rows = []
    for name, layer in point.items():
        values = np.asarray(drawn[name], dtype=float)
        low, high = (float(np.quantile(values, q, method="inverted_cdf")) for q in ((1 - level) / 2, (1 + level) / 2))
        rows.append({"boundary": name, "layer": layer, "low": int(low), "high": int(high),
                     "relative_depth": layer / scale if layer >= 0 else np.nan,
                     "relative_low": low / scale if low >= 0 else np.nan,
                     "relative_high": high / scale if high >= 0 else np.nan,
                     "resamples": int(resamples), "level": level})
    return pd.DataFrame(rows)
