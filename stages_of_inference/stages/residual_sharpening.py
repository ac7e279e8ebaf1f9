"""Stage 4, residual sharpening ("residual calibration" in the NeurIPS version): what the last
blocks do to the output distribution.

* :func:`sharpening_profile`: per block, the change in entropy (bits) and top-1 confidence of the
  logit-lens distribution that the block causes, beside the block's share of suppression neurons;
* :func:`final_block_ablation`: what deleting the last block, the last ``k`` blocks, or one of the
  last blocks alone does to entropy, confidence, loss and calibration
  (:func:`expected_calibration_error`);
* :func:`layer_repetition`: the v3 experiment, every block of a range run twice in place;
  :func:`block_repetition`: every block run twice in place, one block at a time.

The name promises sharpening; the data decide. On SmolLM2-135M the last block *raises* the output
entropy and lowers the top-1 confidence (it calibrates), while the block before it sharpens
(docs/stages/residual_sharpening.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float
from torch import Tensor

from stages_of_inference._tl import Model
from stages_of_inference._utils import check_model, check_tokens, relative_depth
from stages_of_inference.batch import Tokens
from stages_of_inference.interventions.executor import evaluate
from stages_of_inference.interventions.options import EngineOptions
from stages_of_inference.interventions.plan import LayerPlan
from stages_of_inference.lens import Convention, convention_name, convention_record
from stages_of_inference.metrics import DEFAULT_CHUNK_TOKENS
from stages_of_inference.results import provenance, with_provenance
from stages_of_inference.stages.feature_engineering import logit_lens
from stages_of_inference.stages.prediction_ensembling import neuron_counts, neuron_moments

__all__ = ["DEFAULT_BINS", "DEFAULT_CONVENTION", "block_repetition", "expected_calibration_error", "final_block_ablation",
    "layer_repetition", "plan_table", "sharpening_profile"]

DEFAULT_CONVENTION = "per_layer_norm"
"""The logit-lens convention :func:`sharpening_profile` reads blocks through by default: each
readout is then the output distribution of the model truncated after that block, so a block's
change is what appending the block does to a real output distribution, and the last block's
change is exactly the effect of deleting it (see the module docs)."""

DEFAULT_BINS = 15
"""Equal-width confidence bins of :func:`expected_calibration_error` (Guo et al. 2017 use 15)."""


# ----------------------------------------------------------------------------- calibration


def expected_calibration_error(
    confidence: Float[Tensor, " n"] | np.ndarray,
    correct: Bool[Tensor, " n"] | np.ndarray,
    n_bins: int = DEFAULT_BINS,
) -> float:
    """Expected calibration error of top-1 predictions, with ``n_bins`` equal-width bins on [0, 1].

    ``ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b|``; a confidence of exactly ``k /
    n_bins`` falls in bin ``k`` (the last bin is closed at 1).

    Example:
        >>> import torch
        >>> conf, hit = torch.tensor([0.9, 0.9, 0.2, 0.2]), torch.tensor([True, False, False, False])
        >>> round(expected_calibration_error(conf, hit, n_bins=10), 6)  # (2 * |0.5 - 0.9| + 2 * |0 - 0.2|) / 4
        0.3
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive number of bins, got {n_bins}")
    conf = np.asarray(confidence.detach().cpu() if isinstance(confidence, Tensor) else confidence, dtype=np.float64)
    hit = np.asarray(correct.detach().cpu() if isinstance(correct, Tensor) else correct, dtype=np.float64)
    if conf.ndim != 1 or conf.shape != hit.shape:
        raise ValueError(f"confidence and correct must be 1-D and of one length, got {conf.shape} and {hit.shape}")
    if conf.size == 0:
        raise ValueError("no predictions to calibrate")
    if np.any((conf < 0) | (conf > 1)):
        raise ValueError("confidences must lie in [0, 1]")
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    gap = np.bincount(bins, weights=hit - conf, minlength=n_bins)  # sum of (correct - confidence) per bin
    return float(np.abs(gap).sum() / conf.size)


# ----------------------------------------------------------------------------- profile


def _matching_lens(lens: pd.DataFrame, model: Model, tokens: Tokens, convention: Convention,
                   precision: str = "fp32") -> pd.DataFrame:
    """The rows of a given logit-lens table for ``convention``, checked to come from this model,
    these tokens and this precision.
    """
    if not isinstance(lens, pd.DataFrame) or not {"layer", "entropy_bits", "confidence"} <= set(lens.columns):
        raise TypeError("lens must be a logit_lens table (columns layer, entropy_bits, confidence, ...) or None")
    name = convention_name(convention)
    if "convention" in lens.columns:
        lens = lens[lens["convention"] == name]
    n = model.cfg.n_layers
    if sorted(lens["layer"]) != list(range(n + 1)):
        raise ValueError(f"lens must hold one {name!r} row for every readout 0 .. {n} of this model; "
                         "compute it with logit_lens(model, tokens, convention=...)")
    given = lens.attrs.get("provenance", {})
    wanted = provenance(model, tokens)
    for key, part, what in (("model", "config_hash", "model"), ("tokens", "sha256", "token batch")):
        if given.get(key, {}).get(part) != wanted[key][part]:
            raise ValueError(f"lens was computed for a different {what} (its {key} {part} differs); "
                             "pass the lens of this model and these tokens, or lens=None")
    if name == "tuned" and given.get("settings", {}).get("convention", {}).get("key") != convention.key:
        raise ValueError("lens was read through another tuned lens (its key differs); pass the table of this "
                         "TunedLens, or lens=None")
    lens_precision = given.get("settings", {}).get("precision", "fp32")
    if lens_precision != precision:
        raise ValueError(f"lens was computed in precision {lens_precision!r}, not {precision!r}; "
                         "pass a lens of the same precision, or lens=None")
    return lens


def sharpening_profile(
    model: Model,
    tokens: Tokens,
    *,
    convention: Convention = DEFAULT_CONVENTION,
    moments: pd.DataFrame | bool = True,
    kurtosis_threshold: float = 10.0,
    lens: pd.DataFrame | None = None,
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    precision: str = "fp32",
) -> pd.DataFrame:
    """Per block: how much it sharpens (or flattens) the output distribution, read through the
    logit lens, and how many suppression neurons it holds.

    For block ``b`` the lens readout before it (``layer = b``) and after it (``layer = b + 1``) of
    :func:`stages_of_inference.stages.feature_engineering.logit_lens` give mean entropy in bits and
    mean top-1 probability over the scored tokens; the block's change is after minus before
    (negative ``entropy_change_bits`` = the block sharpens). The last block is flagged
    ``is_final``; its ``entropy_after_bits`` is the model's output entropy (exactly so when the
    model has no unembedding bias ``b_U``, which the lens leaves out: Llama-type models such as
    SmolLM2; for GPT-2 the final norm's bias is folded into ``b_U``).

    Conventions (``convention``): with ``"per_layer_norm"`` (the default) the readout after block
    ``b`` is exactly the output distribution of the model truncated after block ``b`` (its final
    norm applied with its own statistics; up to ``b_U``), so a block's change is the effect of appending it to
    the truncated model, and the last block's change equals deleting it
    (:func:`final_block_ablation`). With ``"paper"`` every readout is divided by the final
    residual's norm scale, as the authors' entropy curves are; the readouts are linear in the
    residual stream, but a block's change then also measures how far the residual is from the
    final norm, not only what the block writes (docs/stages/residual_sharpening.md).

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids, BOS first.
        convention: ``"per_layer_norm"``, ``"paper"`` or a :class:`~stages_of_inference.tuned_lens.TunedLens`.
        moments: the output of :func:`..prediction_ensembling.neuron_moments` for this model;
            ``True`` computes it, ``False`` leaves the neuron columns out.
        kurtosis_threshold: for the neuron kinds when ``moments`` is computed here.
        lens: a :func:`~stages_of_inference.stages.feature_engineering.logit_lens` table already
            computed for this model and these tokens (rows of other conventions are ignored), so
            that a study running both does not unembed every layer twice; its provenance must name
            the same model and token digest, else a ``ValueError``. ``None`` computes it.
        batch_size: sequences per forward pass (of the logit lens).
        chunk_tokens: token positions reduced at a time.
        progress: show a progress bar.
        precision: the dtype of the model's products in the logit lens (``"fp32"``, ``"bf16"``,
            ``"fp16"``; :mod:`stages_of_inference.precision`); a given ``lens`` must have it.

    Returns:
        One row per block: ``layer``, ``relative_depth``, ``entropy_before_bits``,
        ``entropy_after_bits``, ``entropy_change_bits``, ``confidence_before``,
        ``confidence_after``, ``confidence_change``, ``accuracy_before``, ``accuracy_after``,
        ``kl_to_final_before_nats``, ``kl_to_final_after_nats``, ``is_final``, ``convention``,
        ``n_tokens``, and unless ``moments=False``: ``n_prediction``, ``n_suppression``,
        ``share_prediction``, ``share_suppression``.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8, d_head=4, d_mlp=16, d_vocab=20, act_fn="relu", normalization_type="LN"))
        >>> df = sharpening_profile(m, torch.randint(0, 20, (2, 6)), progress=False)
        >>> df[["layer", "is_final"]].values.tolist(), "share_suppression" in df
        ([[0, False], [1, True]], True)
    """
    model = check_model(model)
    source, tokens = tokens, check_tokens(model, tokens)
    n = model.cfg.n_layers
    if lens is None:
        lens = logit_lens(model, tokens, convention=convention, batch_size=batch_size,
                          chunk_tokens=chunk_tokens, progress=progress, precision=precision)
    else:
        lens = _matching_lens(lens, model, tokens, convention, precision)
    lens = lens.set_index("layer")
    before, after = lens.loc[0 : n - 1], lens.loc[1:n]
    df = pd.DataFrame({
        "layer": np.arange(n, dtype=np.int64),
        "relative_depth": [relative_depth(b, n) for b in range(n)],
        "entropy_before_bits": before["entropy_bits"].to_numpy(),
        "entropy_after_bits": after["entropy_bits"].to_numpy(),
        "confidence_before": before["confidence"].to_numpy(),
        "confidence_after": after["confidence"].to_numpy(),
        "accuracy_before": before["accuracy"].to_numpy(),
        "accuracy_after": after["accuracy"].to_numpy(),
        "kl_to_final_before_nats": before["kl_to_final_nats"].to_numpy(),
        "kl_to_final_after_nats": after["kl_to_final_nats"].to_numpy(),
    })
    df.insert(4, "entropy_change_bits", df["entropy_after_bits"] - df["entropy_before_bits"])
    df.insert(7, "confidence_change", df["confidence_after"] - df["confidence_before"])
    df["is_final"] = df["layer"] == n - 1
    df["convention"] = convention_name(convention)
    df["n_tokens"] = int(lens["n_tokens"].iloc[0])
    if moments is not False:
        if moments is True:
            moments = neuron_moments(model, kurtosis_threshold, progress=progress)
        if not isinstance(moments, pd.DataFrame):
            raise TypeError("moments must be a neuron_moments table, True (compute it) or False (skip)")
        counts = neuron_counts(moments, n_layers=n).set_index("layer")
        if sorted(counts.index) != list(range(n)):
            raise ValueError(f"moments must cover every block 0 .. {n - 1} of this model")
        for col in ("n_prediction", "n_suppression", "share_prediction", "share_suppression"):
            df[col] = counts.loc[df["layer"], col].to_numpy()
    return with_provenance(df, provenance(
        model, source, analysis="sharpening_profile", convention=convention_record(convention),
        neuron_counts=moments is not False, kurtosis_threshold=kurtosis_threshold, precision=precision,
    ))


# ----------------------------------------------------------------------------- interventions


_CHANGES = {  # derived column -> how it is computed from a plan's row and the reference's (the identity plan)
    "entropy_change_bits": lambda row, ref: row["entropy_bits"] - ref["entropy_bits"],
    "confidence_change": lambda row, ref: row["confidence"] - ref["confidence"],
    "ece_change": lambda row, ref: row["ece"] - ref["ece"],
    "overconfidence": lambda row, ref: row["confidence"] - row["accuracy"],
}


def plan_table(model: Model, tokens: Tensor, plans: Sequence[LayerPlan], labels: dict[str, Any],
               columns: Sequence[str], options: EngineOptions, n_bins: int = DEFAULT_BINS) -> pd.DataFrame:
    """One engine sweep of ``plans`` (the first must be the identity: the reference of every
    change), as a table with one row per plan: the ``labels`` columns (one value per plan), then
    ``columns``, each an engine metric (``entropy_bits``, ``confidence``, ``loss``,
    ``loss_delta``, ``accuracy``, ``relative_accuracy``, ``kl_nats``, ``top1_agreement``,
    ``n_tokens``, ``plan``), the plan's expected calibration error ``ece``
    (:func:`expected_calibration_error`), or a change against the unmodified model
    (``entropy_change_bits``, ``confidence_change``, ``ece_change``; ``overconfidence`` is
    confidence minus accuracy).

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8, d_head=4, d_vocab=20, act_fn="relu"))
        >>> t = plan_table(m, torch.randint(0, 20, (2, 6)), [LayerPlan.identity(2), LayerPlan.drop(2, 1)],
        ...                {"removed": ["", "1"]}, ["kl_nats", "entropy_change_bits"], EngineOptions(progress=False))
        >>> t.columns.tolist(), float(t["entropy_change_bits"].iloc[0])
        (['removed', 'kl_nats', 'entropy_change_bits'], 0.0)
    """
    if not plans or plans[0].order != LayerPlan.identity(plans[0].n_layers).order:
        raise ValueError("the first plan must be the identity (the reference of every change)")
    evaluation = evaluate(model, tokens, plans, dataclasses.replace(options, per_token=True))
    summary = evaluation.summary.copy()
    ece = {plan: expected_calibration_error(group["confidence"].to_numpy(), group["correct"].to_numpy(), n_bins)
           for plan, group in evaluation.per_token.groupby("plan", sort=False)}
    summary["ece"] = summary["plan"].map(ece)
    reference = summary.iloc[0]
    out = pd.DataFrame(dict(labels))
    for column in columns:
        values = _CHANGES[column](summary, reference) if column in _CHANGES else summary[column]
        out[column] = values.to_numpy()
    return out


def final_block_ablation(
    model: Model,
    tokens: Tokens,
    last_k: Sequence[int] = (1, 2, 3),
    *,
    single: bool = True,
    n_bins: int = DEFAULT_BINS,
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    precision: str = "fp32",
) -> pd.DataFrame:
    """What deleting the last block, the last ``k`` blocks, or one late block alone does to the output.

    Every deletion is a :class:`~stages_of_inference.interventions.plan.LayerPlan` run by the engine
    (:func:`~stages_of_inference.interventions.executor.evaluate_plans`): a deleted block's
    attention and MLP outputs are skipped, the residual passes unchanged (PAPER.md). Metrics are
    the engine's, over the scored positions, pooled: mean entropy (bits), mean top-1 confidence,
    loss (nats), top-1 accuracy, KL to the original, and calibration: the expected calibration
    error (:func:`expected_calibration_error`, ``n_bins`` equal-width bins, 15 by default) and the
    mean overconfidence (confidence - accuracy).

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids, BOS first.
        last_k: delete the last ``k`` blocks together, for each ``k``.
        single: also delete block ``n_layers - k`` alone, for each ``k`` > 1.
        n_bins: confidence bins of the ECE.
        batch_size: sequences per sweep pass.
        chunk_tokens: token positions reduced at a time.
        progress: show a progress bar.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the dtype of the model's products
            (:mod:`stages_of_inference.precision`); the metrics stay fp32.

    Returns:
        One row for the original model (``kind`` "none") and one per deletion (``kind`` "last_k":
        blocks ``n - k .. n - 1``; "single": block ``n - k`` alone): ``kind``, ``k``, ``removed``
        (the deleted blocks, e.g. "27,28,29"), ``entropy_bits``, ``entropy_change_bits``,
        ``confidence``, ``confidence_change``, ``loss``, ``loss_delta``, ``accuracy``,
        ``relative_accuracy``, ``kl_nats``, ``top1_agreement``, ``ece``, ``ece_change``,
        ``overconfidence``, ``n_tokens``, ``plan``. The ``*_change`` columns are the deletion's
        value minus the original's; the change a block *causes* is minus that.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=3, d_model=8, n_ctx=8, d_head=4, d_vocab=20, act_fn="relu"))
        >>> df = final_block_ablation(m, torch.randint(0, 20, (2, 6)), last_k=(1, 2), progress=False)
        >>> df[["kind", "removed"]].values.tolist()
        [['none', ''], ['last_k', '2'], ['last_k', '1,2'], ['single', '1']]
    """
    model = check_model(model)
    source, tokens = tokens, check_tokens(model, tokens)
    n = model.cfg.n_layers
    ks = [int(k) for k in last_k]
    if not ks:
        raise ValueError("last_k is empty: give at least one number of final blocks to delete")
    if any(not 1 <= k < n for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"last_k must be distinct numbers in 1 .. {n - 1} (a plan keeps at least one block), got {ks}")
    rows: list[tuple[str, int, tuple[int, ...]]] = [("none", 0, ())]
    rows += [("last_k", k, tuple(range(n - k, n))) for k in ks]
    if single:
        rows += [("single", k, (n - k,)) for k in ks if k > 1]
    plans = [LayerPlan.identity(n)] + [LayerPlan.drop(n, list(removed)) for _, _, removed in rows[1:]]
    labels = {"kind": [r[0] for r in rows], "k": np.array([r[1] for r in rows], dtype=np.int64),
              "removed": [",".join(map(str, r[2])) for r in rows]}
    df = plan_table(model, tokens, plans, labels, (
        "entropy_bits", "entropy_change_bits", "confidence", "confidence_change", "loss", "loss_delta", "accuracy",
        "relative_accuracy", "kl_nats", "top1_agreement", "ece", "ece_change", "overconfidence", "n_tokens", "plan"),
        EngineOptions(batch_size=batch_size, chunk_tokens=chunk_tokens, progress=progress, precision=precision), n_bins)
    return with_provenance(df, provenance(
        model, source, analysis="final_block_ablation", last_k=ks, single=single, n_bins=n_bins,
        ablation="deletion (block outputs skipped; zero-ablation)", precision=precision,
    ))


def layer_repetition(
    model: Model,
    tokens: Tokens,
    start: int,
    stop: int,
    *,
    times: int = 2,
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    precision: str = "fp32",
) -> pd.DataFrame:
    """The v3 layer-repetition experiment: blocks ``start .. end - 1`` each run ``times`` times in
    place (``LayerPlan.repeat``), for every ``end`` from ``start`` (nothing repeated: the original
    model) to ``stop``.

    All plans run in one engine sweep (:func:`~stages_of_inference.interventions.executor.evaluate_plans`),
    sharing their common prefixes.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids, BOS first.
        start: the first repeated block, ``0 <= start <= stop``.
        stop: the block after the last repeated one, ``stop <= n_layers`` (exclusive).
        times: how often each repeated block runs (2 = twice).
        batch_size: sequences per sweep pass.
        chunk_tokens: token positions reduced at a time.
        progress: show a progress bar.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the dtype of the model's products
            (:mod:`stages_of_inference.precision`); the metrics stay fp32.

    Returns:
        One row per ``end`` in ``start .. stop``: ``start``, ``end``, ``n_repeated``, ``repeated``
        (e.g. "10,11"), ``relative_depth_end`` (relative depth of the last repeated block, NaN for
        none), ``entropy_bits``, ``entropy_change_bits``, ``confidence``, ``confidence_change``,
        ``loss``, ``loss_delta``, ``kl_nats`` (KL(original || repeated)), ``accuracy``,
        ``top1_agreement``, ``n_tokens``, ``plan``.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=3, d_model=8, n_ctx=8, d_head=4, d_vocab=20, act_fn="relu"))
        >>> df = layer_repetition(m, torch.randint(0, 20, (2, 6)), 1, 3, progress=False)
        >>> df[["end", "repeated"]].values.tolist(), float(df["kl_nats"].iloc[0])
        ([[1, ''], [2, '1'], [3, '1,2']], 0.0)
    """
    model = check_model(model)
    source, tokens = tokens, check_tokens(model, tokens)
    n = model.cfg.n_layers
    for name, value in (("start", start), ("stop", stop), ("times", times)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= start <= stop <= n:
        raise ValueError(f"need 0 <= start <= stop <= n_layers = {n}, got start={start}, stop={stop}")
    if times < 1:
        raise ValueError(f"times must be at least 1, got {times}")
    ends = list(range(start, stop + 1))
    plans = [LayerPlan.identity(n) if end == start else LayerPlan.repeat(n, range(start, end), times=times)
             for end in ends]
    labels = {"start": np.full(len(ends), start, dtype=np.int64), "end": np.array(ends, dtype=np.int64),
              "n_repeated": np.array([end - start for end in ends], dtype=np.int64),
              "repeated": [",".join(map(str, range(start, end))) for end in ends],
              "relative_depth_end": [relative_depth(end - 1, n) if end > start else float("nan") for end in ends]}
    df = plan_table(model, tokens, plans, labels, (
        "entropy_bits", "entropy_change_bits", "confidence", "confidence_change", "loss", "loss_delta", "kl_nats",
        "accuracy", "top1_agreement", "ece", "n_tokens", "plan"),
        EngineOptions(batch_size=batch_size, chunk_tokens=chunk_tokens, progress=progress, precision=precision))
    return with_provenance(df, provenance(
        model, source, analysis="layer_repetition", start=start, stop=stop, times=times, precision=precision,
    ))


def block_repetition(
    model: Model,
    tokens: Tokens,
    *,
    times: int = 2,
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    precision: str = "fp32",
) -> pd.DataFrame:
    """Every block run ``times`` times in place, one block at a time (``LayerPlan.repeat(n, [i])``
    for each block ``i``), as one prefix-sharing engine sweep: which blocks a model can run again
    without harm (the study's repetition analysis; :func:`layer_repetition` repeats a range).

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids, BOS first.
        times: how often the repeated block runs (2 = twice).
        batch_size: sequences per sweep pass.
        chunk_tokens: token positions reduced at a time.
        progress: show a progress bar.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the dtype of the model's products.

    Returns:
        One row per block: ``layer``, ``relative_depth``, ``entropy_bits``,
        ``entropy_change_bits`` (against the unmodified model), ``kl_nats``, ``loss_delta``,
        ``relative_accuracy``, ``plan``.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=3, d_model=8, n_ctx=8, d_head=4, d_vocab=20, act_fn="relu"))
        >>> block_repetition(m, torch.randint(0, 20, (2, 6)), progress=False)["layer"].tolist()
        [0, 1, 2]
    """
    model = check_model(model)
    source, tokens = tokens, check_tokens(model, tokens)
    if isinstance(times, bool) or not isinstance(times, (int, np.integer)) or times < 1:
        raise ValueError(f"times must be a whole number of runs, at least 1, got {times!r}")
    n = model.cfg.n_layers
    plans = [LayerPlan.identity(n)] + [LayerPlan.repeat(n, [i], times=times) for i in range(n)]
    labels = {"layer": np.arange(-1, n, dtype=np.int64),
              "relative_depth": [float("nan")] + [relative_depth(i, n) for i in range(n)]}
    table = plan_table(model, tokens, plans, labels, (
        "entropy_bits", "entropy_change_bits", "kl_nats", "loss_delta", "relative_accuracy", "plan"),
        EngineOptions(batch_size=batch_size, chunk_tokens=chunk_tokens, progress=progress, precision=precision))
    df = table.iloc[1:].reset_index(drop=True)
    return with_provenance(df, provenance(model, source, analysis="block_repetition", times=times,
                                          blocks="each block alone", precision=precision))
