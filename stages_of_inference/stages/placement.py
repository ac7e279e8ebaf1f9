"""Where the stages lie: the rule that places the four stages on a model's blocks
(:func:`place_stages`), from the sweep, the logit lens, the neuron counts and previous-token
attention. Returns a table; the plots draw it (:func:`stages_of_inference.plots.add_stage_bands`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from stages_of_inference._tables import n_layers_of, require_columns, result_model, table_of

__all__ = ["AGREEMENT", "STAGES", "first_peak", "mlp_takes_over", "neuron_count_array", "place_stages", "stage_signals",
           "stage_starts"]

STAGES = ("detokenization", "feature engineering", "prediction ensembling", "residual sharpening")
"""The four stages of inference, in depth order (Lad et al. 2024)."""


def _band_edges(first: int, last: int, n_layers: int) -> tuple[float, float]:
    if n_layers <= 1:
        return 0.0, 1.0
    step = 1.0 / (n_layers - 1)
    return max(0.0, (first - 0.5) * step), min(1.0, (last + 0.5) * step)


def _drop_kl(sweep: Any) -> pd.Series | None:
    if sweep is None:
        return None
    summary = table_of(sweep, "summary")
    require_columns(summary, ["kind", "layer", "kl_nats"], "place_stages(sweep=...)")
    drops = summary[summary["kind"] == "drop"]
    if drops.empty:
        return None
    return pd.Series(drops["kl_nats"].to_numpy(float), index=drops["layer"].astype(int).to_numpy())


def first_peak(layers: np.ndarray, values: np.ndarray) -> int:
    """The layer of the first local maximum of ``values`` (higher than the next, not lower than the
    previous), else of the maximum.
    """
    for i in range(len(values) - 1):
        if values[i] > values[i + 1] and (i == 0 or values[i] >= values[i - 1]):
            return int(layers[i])
    return int(layers[int(np.argmax(values))])


def place_stages(
    sweep: Any = None,
    lens: pd.DataFrame | None = None,
    neurons: pd.DataFrame | None = None,
    attention: pd.DataFrame | None = None,
    *,
    n_layers: int | None = None,
    fragile: float = 3.0,
    entropy_fall: float = 0.25,
) -> pd.DataFrame:
    """Place the four stages on a model's blocks from its measurements (the "stage-band rule").

    Blocks ``0 .. n-1`` are split at three boundaries ``b <= c <= d`` into detokenization
    ``[0, b)``, feature engineering ``[b, c)``, prediction ensembling ``[c, d)`` and residual
    sharpening ``[d, n)``. A block is *fragile* when deleting it costs more than ``fragile`` times
    the median deletion KL over all blocks.

    * ``b``, end of detokenization: past the leading run of fragile blocks, and past the first
      peak (local maximum) of previous-token attention in the first half of the depth; at least
      1, at most ``n // 2``.
    * ``c``, start of prediction ensembling: the first block after whose output the logit-lens
      entropy (paper convention) has fallen by ``entropy_fall`` of its total fall from the
      embeddings to the output (the lens starts to align with the vocabulary). Without a lens
      table: the first block holding at least a tenth of the peak count of prediction neurons.
    * ``d``, start of residual sharpening: the first block of the trailing run of blocks that are
      fragile or hold more suppression than prediction neurons; at least the last block.

    Boundaries are then ordered (``b <= c <= d``); a stage squeezed to no block is reported with
    ``n_blocks == 0``. Each band spans its blocks' relative depths plus half a block either side
    (clipped to [0, 1]), so neighbouring bands meet.

    Args:
        sweep: a robustness sweep (or its ``summary``) with ``kind == "drop"`` rows.
        lens: a logit-lens table (``layer``, ``entropy_bits``), preferably ``convention="paper"``.
        neurons: ``neuron_counts`` (``layer``, ``n_prediction``, ``n_suppression``) or
            ``neuron_moments`` (``layer``, ``kind``).
        attention: ``previous_token_attention`` (``layer``, ``mean_attention``).
        n_layers: the model's number of blocks (default: from the inputs' provenance or layers).
        fragile: the fragility factor over the median deletion KL.
        entropy_fall: the fraction of the lens entropy's total fall that marks ``c``.

    Returns:
        One row per stage: ``stage``, ``first_layer``, ``last_layer``, ``n_blocks``, ``start``,
        ``end`` (relative depth), ``model``, ``evidence`` (which measurement placed its start).

    Example:
        >>> import pandas as pd
        >>> sweep = pd.DataFrame({"kind": ["drop"] * 10, "layer": range(10),
        ...                       "kl_nats": [8, .3, .2, .2, .1, .1, .2, .3, .5, 2]})
        >>> lens = pd.DataFrame({"layer": range(11), "entropy_bits": [15, 15, 15, 15, 14.8, 14.5, 13, 11, 9, 7, 5]})
        >>> place_stages(sweep, lens)[["stage", "first_layer", "last_layer"]].values.tolist()
        [['detokenization', 0, 0], ['feature engineering', 1, 5], ['prediction ensembling', 6, 8], ['residual sharpening', 9, 9]]
    """
    if not fragile > 1:
        raise ValueError(f"fragile must be a factor above 1, got {fragile}")
    if not 0 < entropy_fall < 1:
        raise ValueError(f"entropy_fall must lie strictly between 0 and 1, got {entropy_fall}")
    kl = _drop_kl(sweep)
    inputs = [x for x in (sweep, lens, neurons, attention) if x is not None]
    if not inputs:
        raise ValueError("place_stages needs at least one measurement: sweep, lens, neurons or attention")
    n = _block_count(inputs, kl, lens) if n_layers is None else int(n_layers)
    if n < 1:
        raise ValueError(f"n_layers must be positive, got {n}")
    model = next((result_model(x) for x in inputs if result_model(x, "") != ""), "model")
    starts = stage_starts(
        n,
        kl=None if kl is None else (kl.index.to_numpy(int), kl.to_numpy(float)),
        entropy=None if lens is None else _lens_entropy(lens),
        attention=None if attention is None else _attention(attention),
        counts=None if neurons is None else neuron_count_array(neurons, n),
        fragile=fragile, entropy_fall=entropy_fall,
    )
    (b, evidence_b), (c, reason_c), (d, reason_d) = starts
    edges = [(0, b, evidence_b or "at least one block"), (b, c, "after detokenization"), (c, d, reason_c), (d, n, reason_d)]
    rows = []
    for stage, (lo, hi, why) in zip(STAGES, edges):
        n_blocks = max(hi - lo, 0)
        start, end = _band_edges(lo, hi - 1, n) if n_blocks else (np.nan, np.nan)
        rows.append({"stage": stage, "first_layer": lo if n_blocks else -1, "last_layer": hi - 1 if n_blocks else -1,
                     "n_blocks": n_blocks, "start": start, "end": end, "model": model, "evidence": why})
    out = pd.DataFrame(rows)
    out.attrs["provenance"] = {"model": {"name": model, "n_layers": n},
                               "settings": {"analysis": "place_stages", "fragile": fragile, "entropy_fall": entropy_fall}}
    return out


Pairs = tuple[np.ndarray, np.ndarray]
"""``(layers, values)``: a measurement per block, for the blocks measured."""


def stage_starts(
    n: int,
    *,
    kl: Pairs | None = None,
    entropy: np.ndarray | None = None,
    attention: Pairs | None = None,
    counts: np.ndarray | None = None,
    fragile: float = 3.0,
    entropy_fall: float = 0.25,
) -> tuple[tuple[int, str], tuple[int, str], tuple[int, str]]:
    """The stage rule of :func:`place_stages` on arrays: the first blocks of feature engineering,
    prediction ensembling and residual sharpening (``b <= c <= d``), each with the evidence that
    placed it. :func:`place_stages` reads its tables into these arrays; the bootstrap
    (:mod:`~stages_of_inference.stages.bootstrap`) calls this once per resample.

    Args:
        n: the number of blocks.
        kl: deletion KL, ``(blocks, values)``.
        entropy: the paper-convention lens entropy at readouts ``0 .. n`` in order.
        attention: previous-token attention, ``(blocks, values)``, blocks in order.
        counts: ``[n, 2]`` prediction and suppression neurons per block.
        fragile: the fragility factor, as :func:`place_stages`.
        entropy_fall: the fraction of the entropy's fall, as :func:`place_stages`.

    Example:
        >>> kl = (np.arange(6), np.array([8, .2, .2, .1, .2, 3]))
        >>> [start for start, _ in stage_starts(6, kl=kl)]
        [1, 3, 5]
    """
    is_fragile = _fragile(kl, n, fragile)
    b, evidence_b = _detokenization_end(is_fragile, attention, n, fragile)
    d, reason_d = _sharpening_start(is_fragile, counts, n)
    c, reason_c = _ensembling_start(entropy, counts, entropy_fall)
    if c is None:
        c = (b + d) // 2
        reason_c = "no lens or neuron data: midway between detokenization and residual sharpening"
    return (b, evidence_b), (min(max(c, b), d), reason_c), (d, reason_d)


def _lens_entropy(lens: Any) -> np.ndarray:
    lt = table_of(lens)
    require_columns(lt, ["layer", "entropy_bits"], "place_stages(lens=...)")
    return lt.sort_values("layer")["entropy_bits"].to_numpy(float)


def _attention(attention: Any) -> Pairs:
    att = table_of(attention)
    require_columns(att, ["layer", "mean_attention"], "place_stages(attention=...)")
    att = att.sort_values("layer")
    return att["layer"].to_numpy(int), att["mean_attention"].to_numpy(float)


def _block_count(inputs: list[Any], kl: pd.Series | None, lens: pd.DataFrame | None) -> int:
    """The number of blocks: from the inputs' provenance, else from their layer columns."""
    for x in inputs:
        n = n_layers_of(x)
        if n:
            return int(n)
    if kl is not None:
        return int(kl.index.max()) + 1
    if lens is not None:
        return int(lens["layer"].max())
    return int(table_of(inputs[0])["layer"].max()) + 1


def _fragile(kl: Pairs | None, n: int, fragile: float) -> np.ndarray:
    """Per block: does deleting it cost more than ``fragile`` times the median deletion KL?"""
    is_fragile = np.zeros(n, dtype=bool)
    if kl is not None and len(kl[1]):
        layers, values = kl
        threshold = fragile * max(float(np.median(values)), 1e-12)
        inside = (layers >= 0) & (layers < n)
        is_fragile[layers[inside]] = values[inside] > threshold
    return is_fragile


def neuron_count_array(neurons: Any, n: int) -> np.ndarray:
    """``[n, 2]``: prediction and suppression neurons per block, from ``neuron_counts`` or from
    per-neuron moments (``layer``, ``kind``); blocks not in the table count none.
    """
    table = table_of(neurons)
    if {"n_prediction", "n_suppression"} <= set(table.columns):
        counts = table.set_index("layer")[["n_prediction", "n_suppression"]]
    else:
        require_columns(table, ["layer", "kind"], "place_stages(neurons=...)")
        counts = pd.crosstab(table["layer"], table["kind"]).reindex(columns=["prediction", "suppression"], fill_value=0)
    return counts.reindex(range(n), fill_value=0).to_numpy(float)


def _detokenization_end(is_fragile: np.ndarray, attention: Pairs | None, n: int, fragile: float) -> tuple[int, str]:
    """``b``: past the leading fragile blocks and the first early peak of previous-token attention."""
    evidence = []
    lead = 0
    while lead < n and is_fragile[lead]:
        lead += 1
    b = lead
    if lead:
        evidence.append(f"deleting block{'s' if lead > 1 else ''} 0..{lead - 1} is fragile (KL > {fragile:g} x median)")
    if attention is not None:
        layers, values = attention
        early = layers <= (n - 1) // 2
        if early.any():
            peak = first_peak(layers[early], values[early])
            b = max(b, peak + 1)
            evidence.append(f"previous-token attention has its first peak at block {peak}")
    return min(max(b, 1), max(n // 2, 1)), "; ".join(evidence)


def _sharpening_start(is_fragile: np.ndarray, counts: np.ndarray | None, n: int) -> tuple[int, str]:
    """``d``: the first block of the trailing run of fragile or suppression-dominated blocks."""
    d = n
    fragile_seen = suppression_seen = False
    reasons: list[str] = []
    while d > 0:
        layer = d - 1
        supp = counts is not None and counts[layer, 1] > max(counts[layer, 0], 0)
        if not (is_fragile[layer] or supp):
            break
        d -= 1
        if is_fragile[layer] and not fragile_seen:
            fragile_seen = True
            reasons.append("fragile under deletion")
        if supp and not suppression_seen:
            suppression_seen = True
            reasons.append("more suppression than prediction neurons")
    if d == n:
        return n - 1, "the last block (no trailing fragile or suppression-dominated run)"
    return d, "; ".join(reasons)


def _ensembling_start(h: np.ndarray | None, counts: np.ndarray | None, entropy_fall: float) -> tuple[int | None, str]:
    """``c``: where the lens entropy ``h`` (readouts in order) has fallen by ``entropy_fall`` of its
    fall, else where prediction neurons appear; ``None`` without either.
    """
    if h is not None and len(h) >= 2:
        fall = h[0] - h[-1]
        if fall > 0:
            below = np.nonzero(h[1:] <= h[0] - entropy_fall * fall)[0]
            if len(below):
                c = int(below[0])  # readout k + 1 is the output of block k
                return c, f"logit-lens entropy has fallen by {entropy_fall:.0%} of its total fall after block {c}"
    if counts is not None and counts[:, 0].max() > 0:
        pred = counts[:, 0]
        c = int(np.nonzero(pred >= max(1, 0.1 * pred.max()))[0][0])
        return c, f"first block with at least a tenth of the peak count of prediction neurons ({c})"
    return None, ""


AGREEMENT = 0.1
"""A signal agrees with the rule when the boundaries are at most this far apart in relative depth."""

_MASSIVE = 100.0


def mlp_takes_over(sublayers: pd.DataFrame) -> int:
    """The first block from which deleting the MLP costs more (KL) than deleting the attention, in
    that block and the next (so one noisy block does not decide); -1 if it never does.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"kind": ["drop_attention"] * 4 + ["drop_mlp"] * 4, "layer": [0, 1, 2, 3] * 2,
        ...                   "kl_nats": [.9, .7, .1, .1, .2, .6, .3, .4]})
        >>> mlp_takes_over(t)
        2
    """
    attn = sublayers[sublayers["kind"] == "drop_attention"].set_index("layer")["kl_nats"]
    mlp = sublayers[sublayers["kind"] == "drop_mlp"].set_index("layer")["kl_nats"]
    layers = sorted(set(attn.index) & set(mlp.index))
    above = [bool(mlp[i] > attn[i]) for i in layers]
    for k in range(len(layers)):
        if above[k] and (k + 1 == len(layers) or above[k + 1]):
            return int(layers[k])
    return -1


def stage_signals(stages: pd.DataFrame, sinks: pd.DataFrame | None = None,
                  depth: pd.DataFrame | None = None, sublayers: pd.DataFrame | None = None,
                  phases: pd.DataFrame | None = None, intervals: pd.DataFrame | None = None) -> pd.DataFrame:
    """The boundary each signal beyond the paper suggests, beside the rule's (:func:`place_stages`).

    * *massive activations switch on* (the ``sinks`` profile): the first block entering which the
      largest residual activation is at least 100 times the median; suggests the end of
      detokenization (the start of feature engineering);
    * *sink heads take over* (the same profile): the first block where at least half of the heads
      put more than half of their attention on the first token; suggests the start of prediction
      ensembling;
    * *half the predictions have settled* (the ``depth_summary`` of
      :func:`~stages_of_inference.stages.feature_engineering.prediction_depth`): the block after
      which the median token's top-1 stays the final one; suggests the start of residual sharpening;
    * *MLP damage overtakes attention damage* (a sweep with ``drop_attention`` and ``drop_mlp``
      plans, :func:`mlp_takes_over`): early blocks mix tokens through attention, the feature
      engineering stage is read as MLP work; suggests the start of feature engineering;
    * Mix-Compress-Refine's phases (:func:`~stages_of_inference.stages.competing.phase_boundaries`):
      *compression begins* (the first token's norm jumps) suggests the start of feature
      engineering; *the compression valley ends* (the entropy recovers) suggests the start of
      residual sharpening, the late phase in which Queipo-de-Llano et al. see the representations
      refined.

    Args:
        stages: the stage table of the model (:func:`place_stages`).
        sinks: its ``sink_profile`` table, or ``None``.
        depth: its prediction-depth summary (one convention's row is used), or ``None``.
        sublayers: a sweep summary with ``drop_attention`` and ``drop_mlp`` rows, or ``None``.
        phases: the ``phases`` table of the competing readings, or ``None``.
        intervals: bootstrap intervals of the boundaries
            (:func:`~stages_of_inference.stages.bootstrap.boundary_intervals`), or ``None``.
            Where a signal and the rule's boundary both have one, they agree when the intervals
            overlap; otherwise when the point estimates are within :data:`AGREEMENT`.

    Returns:
        One row per signal available: ``signal``, ``boundary`` (the stage it suggests starts
        there), ``layer``, ``relative_depth``, ``rule_layer``, ``rule_depth`` (the rule's first
        block of that stage), ``agrees`` (within :data:`AGREEMENT` of relative depth; False where
        the signal never fires, ``layer`` -1); with ``intervals``, also ``low``, ``high``,
        ``rule_low``, ``rule_high`` (blocks; missing where not resampled) and ``judged_by``
        (``"intervals"`` or ``"distance"``).

    Example:
        >>> import pandas as pd
        >>> stages = pd.DataFrame({"stage": ["detokenization", "feature engineering", "prediction ensembling",
        ...                                  "residual sharpening"], "first_layer": [0, 2, 6, 9]})
        >>> sinks = pd.DataFrame({"layer": range(10), "massive_ratio": [1, 5, 300] + [900] * 7,
        ...                       "sink_heads_share": [0] * 3 + [.75] * 7})
        >>> stage_signals(stages, sinks)[["boundary", "layer", "rule_layer", "agrees"]].values.tolist()
        [['feature engineering', 2, 2, True], ['prediction ensembling', 3, 6, False]]
    """
    first = dict(zip(stages["stage"], stages["first_layer"].astype(int)))
    n = int(stages["n_blocks"].sum()) if "n_blocks" in stages else None
    found: list[tuple[str, str, int]] = []
    if sinks is not None:
        n = n or len(sinks)
        ordered = sinks.sort_values("layer")
        massive = ordered[ordered["massive_ratio"] >= _MASSIVE]
        found.append(("massive activations switch on", "feature engineering",
                      int(massive["layer"].iloc[0]) if len(massive) else -1))
        sinky = ordered[ordered["sink_heads_share"] >= 0.5]
        found.append(("sink heads take over", "prediction ensembling", int(sinky["layer"].iloc[0]) if len(sinky) else -1))
    if depth is not None:
        row = depth[depth["convention"] == "per_layer_norm"].iloc[0] if (depth["convention"] == "per_layer_norm").any() \
            else depth.iloc[0]
        found.append(("half the predictions have settled", "residual sharpening", max(int(row["median_depth"]) - 1, 0)))
    if sublayers is not None:
        n = n or int(sublayers["layer"].max()) + 1
        found.append(("MLP damage overtakes attention damage", "feature engineering", mlp_takes_over(sublayers)))
    if phases is not None:
        at = dict(zip(phases["phase"], phases["readout"].astype(int)))
        found.append(("compression begins (the first token's norm jumps)", "feature engineering", at["compression"]))
        found.append(("the compression valley ends (the entropy recovers)", "residual sharpening", at["refinement"]))
    n = n or max([layer for _, _, layer in found] + [1]) + 1
    rows = []
    for signal, boundary, layer in found:
        rule = first.get(boundary, -1)
        rows.append({"signal": signal, "boundary": boundary, "layer": layer,
                     "relative_depth": layer / (n - 1) if layer >= 0 and n > 1 else float("nan"),
                     "rule_layer": rule, "rule_depth": rule / (n - 1) if rule >= 0 and n > 1 else float("nan")})
    out = pd.DataFrame(rows, columns=["signal", "boundary", "layer", "relative_depth", "rule_layer", "rule_depth"])
    out["agrees"] = (out["layer"] >= 0) & ((out["relative_depth"] - out["rule_depth"]).abs() <= AGREEMENT)
    if intervals is None:
        return out
    return _judged_by_intervals(out, intervals)


def _judged_by_intervals(out: pd.DataFrame, intervals: pd.DataFrame) -> pd.DataFrame:
    """The signals table with intervals, agreement by overlap where both sides have one."""
    known = intervals.set_index("boundary")

    def bounds(name: str) -> tuple[float, float]:
        return (float(known.loc[name, "low"]), float(known.loc[name, "high"])) if name in known.index else (np.nan, np.nan)
    out = out.copy()
    out["low"], out["high"] = zip(*(bounds(name) for name in out["signal"])) if len(out) else ([], [])
    out["rule_low"], out["rule_high"] = zip(*(bounds(f"rule: {b}") for b in out["boundary"])) if len(out) else ([], [])
    both = out[["low", "high", "rule_low", "rule_high"]].notna().all(axis=1) & (out["layer"] >= 0) & (out["low"] >= 0)
    overlap = (out["low"] <= out["rule_high"]) & (out["rule_low"] <= out["high"])
    out["agrees"] = out["agrees"].where(~both, overlap)
    out["judged_by"] = np.where(both, "intervals", "distance")
    return out
