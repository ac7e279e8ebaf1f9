"""The robustness experiment of the paper: delete every block, swap every adjacent pair.

:func:`robustness_sweep` runs every single-block deletion (the authors zero the block's attention
and MLP outputs; skipping the block is the same computation) and every adjacent swap (the authors
exchange the two blocks' weights and reload; running the blocks in the order ``..., i+1, i, ...`` is
the same computation) as one prefix-sharing sweep (:func:`stages_of_inference.interventions.executor.evaluate_plans`),
and returns a tidy :class:`SweepResult`. With ``out_dir``, each finished batch of sequences is
checkpointed, and a rerun with the same folder, model, tokens and settings resumes where it stopped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages_of_inference._tl import Model
from stages_of_inference._utils import check_model, check_tokens, relative_depth
from stages_of_inference.batch import Tokens
from stages_of_inference.interventions.checkpoint import SweepCheckpoint, refuse_mismatch, sweep_fingerprint
from stages_of_inference.interventions.deviation import check_plan_ids, precision_check
from stages_of_inference.interventions.effects import aggregate_effects
from stages_of_inference.interventions.executor import BatchResult, aggregate, iter_plan_batches, label_plan_ids
from stages_of_inference.interventions.options import EngineOptions
from stages_of_inference.interventions.plan import LayerPlan
from stages_of_inference.results import PROVENANCE_FILE, Result, provenance, weights_hash  # noqa: F401 (public here too)

__all__ = ["EFFECT_COLUMNS", "MIDDLE", "PAPER_KINDS", "PER_TOKEN_COLUMNS", "RUN_COLUMNS", "SUMMARY_COLUMNS", "SWEEP_KINDS", "SweepResult", "check_kinds",
           "finish_sweep", "robustness_sweep", "run_collapse", "run_kinds", "run_length", "run_table", "summary_on", "sweep_partial", "weights_hash"]

SWEEP_KINDS = ("drop", "swap", "drop_attention", "drop_mlp")
"""The interventions :func:`robustness_sweep` knows: delete a block, swap it with the next, delete
only its attention, delete only its MLP; and deletions of runs of adjacent blocks, ``"drop_<k>"``
for any ``k`` of 2 or more (:func:`run_kinds`)."""

PAPER_KINDS = ("drop", "swap")
"""The paper's interventions: :func:`robustness_sweep`'s default."""

EFFECT_COLUMNS = (
    "kind", "layer", "relative_depth", "step", "block", "block_relative_depth", "relative_change",
    "relative_change_sem", "relative_size", "cosine",
)
"""The columns of the sweep's ``layer_effects`` table (:mod:`stages_of_inference.interventions.effects`)."""

SUMMARY_COLUMNS = (
    "kind", "layer", "relative_depth", "kl_nats", "loss", "loss_delta", "accuracy",
    "relative_accuracy", "top1_agreement", "entropy_bits", "n_tokens",
    "kl_nats_sem", "loss_sem", "loss_delta_sem", "accuracy_sem", "relative_accuracy_sem", "top1_agreement_sem",
    "entropy_bits_sem",
)
"""The columns of :attr:`SweepResult.summary`, in order: DESIGN.md's public contract, then the
standard error over sequences of each metric (the standard error of the per-sequence means)."""

PER_TOKEN_COLUMNS = (
    "kind", "layer", "sequence", "position", "token", "top1", "top1_original", "kl_nats", "loss",
    "loss_original", "loss_delta", "entropy_bits", "confidence", "correct", "agree",
)
"""The columns of :attr:`SweepResult.per_token`."""



@dataclass
class SweepResult(Result):
    """The result of :func:`robustness_sweep`: a ``summary`` table, optionally a ``per_token``
    table, and their provenance; saves to and loads from a folder (Parquet or CSV plus JSON).

    Example:
        >>> import pandas as pd, tempfile
        >>> r = SweepResult({"summary": pd.DataFrame({"kind": ["none"], "layer": [None]})}, {"seed": 0})
        >>> r.per_token is None, SweepResult.load(r.save(tempfile.mkdtemp() + "/s")).summary["kind"].tolist()
        (True, ['none'])
    """

    def __post_init__(self) -> None:
        # ``layer`` is a nullable integer (no layer for the original model); CSV reads it back as
        # float, so restore the dtype on load.
        for df in self.tables.values():
            if "layer" in df.columns and df["layer"].dtype != "Int64":
                df["layer"] = pd.array(df["layer"].to_numpy(dtype="float64"), dtype="Float64").astype("Int64")
        super().__post_init__()

    @property
    def summary(self) -> pd.DataFrame:
        """One row per intervention and one ``kind == "none"`` row (:data:`SUMMARY_COLUMNS`)."""
        return self["summary"]

    @property
    def per_token(self) -> pd.DataFrame | None:
        """Per-token metrics (:data:`PER_TOKEN_COLUMNS`), when the sweep was asked for them."""
        return self.tables.get("per_token")


def run_length(kind: str) -> int | None:
    """The number of adjacent blocks a ``"drop_<k>"`` kind deletes, or ``None`` for another kind.

    Example:
        >>> run_length("drop_3"), run_length("drop"), run_length("drop_mlp")
        (3, None, None)
    """
    match = re.fullmatch(r"drop_([0-9]+)", kind) if isinstance(kind, str) else None
    return int(match.group(1)) if match else None


def run_kinds(n_layers: int, longest: int | None = None) -> tuple[str, ...]:
    """The contiguous-deletion kinds of a model of ``n_layers`` blocks: ``"drop_2"`` up to
    ``"drop_<longest>"``, by default runs of up to a quarter of the model (at least 2 blocks, and
    fewer than all of them; none for a model of 2 blocks or fewer).

    Example:
        >>> run_kinds(30), run_kinds(4), run_kinds(2)
        (('drop_2', 'drop_3', 'drop_4', 'drop_5', 'drop_6', 'drop_7'), ('drop_2',), ())
    """
    longest = max(2, n_layers // 4) if longest is None else longest
    return tuple(f"drop_{k}" for k in range(2, min(longest, n_layers - 1) + 1))


def _starts(kind: str, n_layers: int) -> range:
    """The first blocks of every intervention of ``kind`` in a model of ``n_layers`` blocks."""
    if kind == "swap":
        return range(n_layers - 1)
    k = run_length(kind)
    return range(n_layers - k + 1) if k is not None else range(n_layers)


def _plan(kind: str, n_layers: int, layer: int) -> LayerPlan:
    """The plan of intervention ``kind`` at block ``layer`` (a run's first block)."""
    k = run_length(kind)
    if k is not None:
        return LayerPlan.drop(n_layers, range(layer, layer + k))
    make = {"drop": LayerPlan.drop, "swap": LayerPlan.swap, "drop_attention": LayerPlan.drop_attention,
            "drop_mlp": LayerPlan.drop_mlp}
    return make[kind](n_layers, layer)


def _plans(n_layers: int, kinds: Sequence[str]) -> tuple[list[LayerPlan], list[tuple[str, int | None]]]:
    plans = [LayerPlan.identity(n_layers)]
    meta: list[tuple[str, int | None]] = [("none", None)]
    for kind in kinds:
        layers = _starts(kind, n_layers)
        plans += [_plan(kind, n_layers, i) for i in layers]
        meta += [(kind, i) for i in layers]
    return plans, meta


def _labels(meta: Sequence[tuple[str, int | None]]) -> pd.DataFrame:
    """Each plan's ``kind`` and ``layer``, indexed by plan id (-1: the unmodified model)."""
    kinds = ["none"] + [kind for kind, _ in meta]
    layers = pd.array([None] + [layer for _, layer in meta], dtype="Int64")
    return pd.DataFrame({"kind": kinds, "layer": layers}, index=range(-1, len(meta)))


def _effects(batches: Sequence[BatchResult], labels: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """The pooled layer effects with each plan's kind and layer (:data:`EFFECT_COLUMNS`)."""
    table = label_plan_ids(aggregate_effects([b.effects for b in batches if b.effects is not None]), labels)
    table.insert(2, "relative_depth", [np.nan if layer is pd.NA else relative_depth(int(layer), n_layers)
                                       for layer in table["layer"]])
    table["block_relative_depth"] = [relative_depth(int(b), n_layers) for b in table["block"]]
    return table[list(EFFECT_COLUMNS)]


def summary_on(per_token: pd.DataFrame, sequences: Sequence[int], n_layers: int) -> pd.DataFrame:
    """A sweep's summary recomputed from its per-token table on some of its sequences (to compare
    with another sweep run on those sequences only), pooled the way the sweep pools: means over
    tokens, standard errors over the sequences' means, accuracy retained against the unmodified
    model's accuracy on the same tokens.

    Args:
        per_token: the ``per_token`` table of :func:`robustness_sweep` (:data:`PER_TOKEN_COLUMNS`).
        sequences: the sequence indices to keep.
        n_layers: the model's number of blocks.

    Returns:
        ``kind``, ``layer``, ``relative_depth``, then ``kl_nats``, ``loss_delta``,
        ``relative_accuracy``, ``top1_agreement`` and their ``_sem``, ``n_tokens``.

    Example:
        >>> tok = pd.DataFrame({"kind": ["none", "none", "drop", "drop"], "layer": pd.array([None, None, 0, 0], dtype="Int64"),
        ...                     "sequence": [0, 1, 0, 1], "kl_nats": [0, 0, .5, 1.5], "loss_delta": [0, 0, .1, .3],
        ...                     "correct": [True, True, True, False], "agree": [True, True, True, False]})
        >>> summary_on(tok, [0, 1], 2)[["kind", "kl_nats", "kl_nats_sem", "relative_accuracy"]].values.tolist()
        [['none', 0.0, 0.0, 1.0], ['drop', 1.0, 0.5, 0.5]]
    """
    keep = per_token[per_token["sequence"].isin(list(sequences))]
    if keep.empty:
        raise ValueError(f"none of the sequences {list(sequences)[:5]} is in the per-token table")
    keys = ["kind", "layer"]
    flat = keep.assign(layer=keep["layer"].astype("float64").fillna(-1), correct=keep["correct"].astype(float),
                       agree=keep["agree"].astype(float))
    metrics = {"kl_nats": "kl_nats", "loss_delta": "loss_delta", "relative_accuracy": "correct", "top1_agreement": "agree"}
    pooled = flat.groupby(keys, sort=False)[list(metrics.values())].mean()
    per_seq = flat.groupby([*keys, "sequence"], sort=False)[list(metrics.values())].mean().groupby(level=keys, sort=False)
    sem = (per_seq.std(ddof=1) / np.sqrt(per_seq.size().to_numpy()[:, None])).fillna(0.0)
    base = float(pooled.loc[("none", -1.0), "correct"]) if ("none", -1.0) in pooled.index else float("nan")
    out = pd.DataFrame({"kind": [k for k, _ in pooled.index],
                        "layer": pd.array([None if layer < 0 else int(layer) for _, layer in pooled.index], dtype="Int64")})
    out["relative_depth"] = [np.nan if layer < 0 else relative_depth(int(layer), n_layers) for _, layer in pooled.index]
    for name, column in metrics.items():
        scale = base if name == "relative_accuracy" else 1.0
        if not scale > 0:  # an unmodified model with no token right: nothing to retain
            out[name] = out[f"{name}_sem"] = np.nan
            continue
        out[name] = pooled[column].to_numpy() / scale
        out[f"{name}_sem"] = sem.reindex(pooled.index)[column].to_numpy() / scale
    out["n_tokens"] = flat.groupby(keys, sort=False).size().to_numpy()
    return out


def _check_sequences(value: Any, n_sequences: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"check_sequences must be a number of sequences, 0 .. {n_sequences} (0: no precision check), "
                         f"got {value!r}")
    return min(int(value), n_sequences)


def check_kinds(kinds: Any) -> tuple[str, ...]:
    """``kinds`` (one kind or several of :data:`SWEEP_KINDS`, or ``"drop_<k>"`` runs) as a tuple,
    or a one-line error.

    Example:
        >>> check_kinds("drop"), check_kinds(["drop", "swap"]), check_kinds("drop_3")
        (('drop',), ('drop', 'swap'), ('drop_3',))
    """
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in SWEEP_KINDS and not (run_length(k) or 0) >= 2]
    if unknown:
        raise ValueError(f"unknown sweep kind(s) {unknown}; allowed: {', '.join(SWEEP_KINDS)}, or drop_<k> (a run of "
                         "k >= 2 adjacent blocks)")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"sweep kinds listed twice: {list(kinds)}")
    return kinds


def robustness_sweep(
    model: Model,
    tokens: Tokens,
    kinds: Sequence[str] = PAPER_KINDS,
    options: EngineOptions | None = None,
    *,
    out_dir: str | Path | None = None,
    check_sequences: int = 1,
    **settings: Any,
) -> SweepResult:
    """Delete each block, and swap each adjacent pair, and measure the damage (PAPER.md).

    Every intervention is compared with the unmodified model on the scored positions (after BOS,
    with a true next token) of every sequence: KL(original || intervened) in nats, next-token loss
    and its increase, top-1 accuracy and its ratio to the original's, top-1 agreement with the
    original, and entropy in bits. All interventions and the original model run as one
    prefix-sharing sweep per batch of sequences.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids, BOS first.
        kinds: any of :data:`SWEEP_KINDS`: ``"drop"`` (every block ``0 .. n_layers - 1``),
            ``"swap"`` (blocks ``i, i + 1`` for every ``i`` in ``0 .. n_layers - 2``),
            ``"drop_attention"`` and ``"drop_mlp"`` (one sublayer of every block: the block runs
            with only its MLP, or only its attention). Default: the paper's two.
        options: how the sweep executes
            (:class:`~stages_of_inference.interventions.options.EngineOptions`: ``batch_size``,
            ``chunk_tokens``, ``stack_tokens``, ``fast_path``, ``per_token`` (also keep the
            per-token table), ``progress``, ``precision`` (``"fp32"``, the paper's setting,
            ``"bf16"`` or ``"fp16"``: the dtype of the model's matrix products and attention; the
            residual stream and every metric stay fp32, :mod:`stages_of_inference.precision`),
            ``layer_effects`` (also measure, inside the same trie, how each intervention changes
            what every later block writes to the residual stream,
            :mod:`~stages_of_inference.interventions.effects`: a ``layer_effects`` table,
            :data:`EFFECT_COLUMNS`), ...); or give its fields as keywords (``settings``), not both.
        out_dir: a folder for checkpoints and the final result. A rerun with the same folder and the
            same model, tokens and settings resumes (or, if finished, loads) the result; a folder
            written by a different sweep is refused.
        check_sequences: with a low ``precision``, the sweep measures its own error: a fixed
            subset of plans is re-run in fp32 on this many sequences (the first ones; with one, about
            a tenth of the time of a bf16 sweep of eight sequences) and compared
            (:func:`~stages_of_inference.interventions.deviation.precision_check`); 0 skips it.
        **settings: the fields of ``EngineOptions`` as keywords.

    Returns:
        A :class:`SweepResult`; ``summary`` has :data:`SUMMARY_COLUMNS`, with ``layer`` the block
        dropped or the first of the swapped pair, ``relative_depth`` = ``layer / (n_layers - 1)``,
        and one ``kind == "none"`` row for the original model (no layer). With a low precision
        and ``check_sequences > 0`` there is also a ``precision_check`` table (``kind``,
        ``layer``, then each metric in the low precision and in fp32) and its summary in the
        provenance (``precision_check``). With ``layer_effects``, a ``layer_effects`` table: per
        intervention (``kind``, ``layer``) and block it ran off the unmodified order (``block``,
        at execution ``step``), the mean over tokens of ``relative_change`` = ``|| c_block(plan) -
        c_block || / || c_block ||`` (``c``: what the block adds to the residual stream), with its
        standard error over sequences, and the contribution's ``relative_size`` and ``cosine``
        against the residual it reads; ``kind == "none"`` rows give every block of the
        unmodified model (relative change 0). The unmodified model's numbers are also in the
        provenance (``settings.reference``).

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> s = robustness_sweep(m, torch.tensor([[0, 1, 2, 3, 4]]), progress=False).summary
        >>> s["kind"].tolist(), s["layer"].tolist()
        (['none', 'drop', 'drop', 'swap'], [<NA>, 0, 1, 0])
    """
    options = EngineOptions.from_settings(options, settings)
    out = None if out_dir is None else Path(out_dir)
    if out is not None and (out / PROVENANCE_FILE).exists():
        model = check_model(model)
        finished = SweepResult.load(out)
        refuse_mismatch(out, finished.provenance.get("settings", {}).get("fingerprint", {}),
                        sweep_fingerprint(model, check_tokens(model, tokens),
                                          _settings(model, kinds, options, tokens, check_sequences)))
        return finished
    part = sweep_partial(model, tokens, kinds, options, checkpoint_dir=out, check_sequences=check_sequences)
    result = finish_sweep([part])
    if out is not None:
        result.save(out)
    return result


def _settings(model: Model, kinds: Sequence[str], options: EngineOptions, tokens: Tokens,
              check_sequences: int) -> dict[str, Any]:
    """The sweep's settings as its provenance and checkpoint fingerprint record them."""
    kinds = check_kinds(kinds)
    too_long = [k for k in kinds if (run_length(k) or 0) >= model.cfg.n_layers]
    if too_long:
        raise ValueError(f"sweep kind(s) {too_long} delete all {model.cfg.n_layers} blocks of the model or more; "
                         f"runs of 2 .. {model.cfg.n_layers - 1} blocks are allowed")
    settings = {"kinds": list(kinds), "per_token": options.per_token, "batch_size": options.batch_size,
                "chunk_tokens": options.chunk_tokens, "fast_path": options.fast_path,
                "stack_tokens": options.stack_tokens_for(model.cfg.device), "precision": options.precision}
    if options.precision != "fp32":
        settings["check_sequences"] = _check_sequences(check_sequences, len(tokens))
    if options.layer_effects:
        settings["layer_effects"] = True
    return settings


def sweep_partial(
    model: Model,
    tokens: Tokens,
    kinds: Sequence[str] = PAPER_KINDS,
    options: EngineOptions | None = None,
    *,
    first_sequence: int = 0,
    checkpoint_dir: str | Path | None = None,
    check_sequences: int = 1,
    **settings: Any,
) -> dict[str, pd.DataFrame]:
    """The additive part of :func:`robustness_sweep` on some sequences (one shard of a larger
    batch): :func:`finish_sweep` of the partials of every shard equals the sweep of them all.

    Nothing in a partial is a mean: ``sums`` holds, per plan (``plan_id``; -1 the unmodified
    model) and sequence, the number of scored tokens and the float64 sums of each per-token
    metric; ``per_token`` the per-token rows; ``effects`` the layer-effect sums per sequence.
    Sequences are numbered from ``first_sequence``. A low-precision sweep's own precision check
    runs in the shard that holds sequence 0 (``precision_check``). The other arguments are
    :func:`robustness_sweep`'s; ``checkpoint_dir`` keeps each finished batch (resumed on a rerun).

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> t = torch.tensor([[0, 1, 2, 3, 4], [0, 2, 1, 4, 3]])
        >>> parts = [sweep_partial(m, t[:1], progress=False), sweep_partial(m, t[1:], first_sequence=1, progress=False)]
        >>> merged, whole = finish_sweep(parts).summary, robustness_sweep(m, t, progress=False).summary
        >>> bool(((merged["kl_nats"] - whole["kl_nats"]).abs() < 1e-7).all()), merged["n_tokens"].tolist()
        (True, [6, 6, 6, 6])
    """
    options = EngineOptions.from_settings(options, settings)
    model = check_model(model)
    source, tokens = tokens, check_tokens(model, tokens)
    if isinstance(first_sequence, bool) or not isinstance(first_sequence, (int, np.integer)) or first_sequence < 0:
        raise ValueError(f"first_sequence must be a sequence number (0 or more), got {first_sequence!r}")
    settings = _settings(model, kinds, options, tokens, check_sequences)
    if first_sequence:
        settings["first_sequence"] = int(first_sequence)
    plans, meta = _plans(model.cfg.n_layers, settings["kinds"])
    fingerprint: dict[str, Any] | None = None
    checkpoint: SweepCheckpoint | None = None
    batches: dict[int, BatchResult] = {}
    if checkpoint_dir is not None:
        fingerprint = sweep_fingerprint(model, tokens, settings)
        checkpoint = SweepCheckpoint(checkpoint_dir)
        batches = checkpoint.open(fingerprint, options.per_token)
    for batch in iter_plan_batches(model, tokens, plans, options, skip=frozenset(batches),
                                   first_sequence=int(first_sequence)):
        if checkpoint is not None:
            checkpoint.save(batch)
        batches[batch.index] = batch
    ordered = [batches[k] for k in sorted(batches)]
    record = provenance(model, source, analysis="robustness_sweep", **settings, fingerprint=fingerprint)
    tables = {"sums": pd.concat([b.sums for b in ordered], ignore_index=True)}
    if options.per_token:
        tables["per_token"] = pd.concat([b.per_token for b in ordered if b.per_token is not None], ignore_index=True)
    if options.layer_effects:
        tables["effects"] = pd.concat([b.effects for b in ordered if b.effects is not None], ignore_index=True)
    n_check = settings.get("check_sequences", 0)
    if options.precision != "fp32" and n_check > 0 and first_sequence == 0:
        check = precision_check(model, tokens, plans, check_plan_ids(*zip(*meta)), ordered, options, n_check)
        tables["precision_check"] = check.table
        record["precision_check"] = check.summary
    for table in tables.values():
        table.attrs["provenance"] = record
    return tables


def finish_sweep(partials: Sequence[dict[str, pd.DataFrame]]) -> SweepResult:
    """The sweep's tables from the :func:`sweep_partial` of every shard (in any order): the sums
    are pooled over all sequences (means over tokens, standard errors over the sequences' means),
    never averaged shard by shard; the per-token rows are ordered by plan (the reference
    first), sequence and position, whatever the batches and shards were.

    The provenance is the first shard's, with ``shards`` (each shard's first sequence, sequences
    and token digest) where there are several.
    """
    if not partials:
        raise ValueError("finish_sweep needs at least one partial (sweep_partial's tables)")
    parts = sorted(partials, key=lambda p: int(p["sums"]["sequence"].min()))
    first = dict(parts[0]["sums"].attrs.get("provenance", {}))
    settings = dict(first.get("settings", {}))
    kinds, n_layers = settings.get("kinds"), first.get("model", {}).get("n_layers")
    if kinds is None or n_layers is None:
        raise ValueError("a partial lacks its provenance (settings.kinds, model.n_layers): give sweep_partial's tables")
    for part in parts[1:]:
        other = part["sums"].attrs.get("provenance", {})
        if other.get("settings", {}).get("kinds") != kinds or other.get("model", {}).get("config_hash") != first["model"].get("config_hash"):
            raise ValueError("partials of different sweeps (kinds or model differ) cannot be finished together")
    seqs = np.concatenate([p["sums"]["sequence"].unique() for p in parts])
    if len(np.unique(seqs)) != len(seqs):
        raise ValueError("two partials hold the same sequence: each shard must hold its own sequences")
    plans, meta = _plans(int(n_layers), kinds)
    per_token = "per_token" in parts[0]
    effects = "effects" in parts[0]
    merged = BatchResult(0, pd.concat([p["sums"] for p in parts], ignore_index=True),
                         pd.concat([p["per_token"] for p in parts], ignore_index=True) if per_token else None,
                         pd.concat([p["effects"] for p in parts], ignore_index=True) if effects else None)
    pooled = aggregate([p.order for p in plans], int(n_layers), [merged])
    table, labels = pooled.summary, _labels(meta)
    summary = pd.DataFrame({
        "kind": [kind for kind, _ in meta],
        "layer": pd.array([layer for _, layer in meta], dtype="Int64"),
        "relative_depth": [np.nan if layer is None else relative_depth(layer, int(n_layers)) for _, layer in meta],
    })
    for column in SUMMARY_COLUMNS[3:]:
        summary[column] = table[column].to_numpy()
    summary["n_tokens"] = summary["n_tokens"].astype(np.int64)
    tables = {"summary": summary}
    if per_token:  # one row order whatever the batches and shards: plan, sequence, position
        tok = merged.per_token.sort_values(["plan_id", "sequence", "position"], kind="stable", ignore_index=True)
        tables["per_token"] = label_plan_ids(tok, labels)[list(PER_TOKEN_COLUMNS)]
    if effects:
        tables["layer_effects"] = _effects([merged], labels, int(n_layers))
    checks = [p["precision_check"] for p in parts if "precision_check" in p]
    if checks:
        tables["precision_check"] = label_plan_ids(checks[0], labels).drop(columns="label")
    settings["reference"] = pooled.reference
    settings.pop("first_sequence", None)
    record = {**first, "settings": settings}
    if len(parts) > 1:
        record["shards"] = [{"first_sequence": int(p["sums"]["sequence"].min()),
                             "tokens": p["sums"].attrs.get("provenance", {}).get("tokens")} for p in parts]
        record["settings"].pop("fingerprint", None)
    return SweepResult(tables, record)


RUN_COLUMNS = ("k", "start", "end", "relative_depth", "middle_depth", "kl_nats", "kl_nats_sem", "loss_delta",
               "relative_accuracy", "top1_agreement", "n_tokens")
"""The columns of :func:`run_table`."""

MIDDLE = (0.25, 0.75)
"""The middle of a model, in relative depth: a run lies in it when its first and last blocks do."""


def run_table(summary: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """The contiguous deletions of a sweep summary (kinds ``"drop_<k>"``), one row per run.

    Args:
        summary: a :attr:`SweepResult.summary` with ``drop_<k>`` rows (``layer`` the run's first block).
        n_layers: the model's number of blocks.

    Returns:
        :data:`RUN_COLUMNS`: the run's length ``k``, its ``start`` and ``end`` blocks (both
        deleted), the ``relative_depth`` of its start (``start / (n_layers - 1)``) and of its
        middle (``middle_depth``), then the sweep's metrics.

    Example:
        >>> s = pd.DataFrame({"kind": ["none", "drop", "drop_2"], "layer": pd.array([None, 0, 1], dtype="Int64"),
        ...                   "kl_nats": [0, .1, .4], "kl_nats_sem": [0, 0, .1], "loss_delta": [0, .1, .3],
        ...                   "relative_accuracy": [1, .9, .8], "top1_agreement": [1, .8, .7], "n_tokens": [9, 9, 9]})
        >>> run_table(s, 5)[["k", "start", "end", "relative_depth", "middle_depth", "kl_nats"]].values.tolist()
        [[2.0, 1.0, 2.0, 0.25, 0.375, 0.4]]
    """
    lengths = summary["kind"].map(run_length)
    runs = summary[lengths.notna()]
    k = lengths[lengths.notna()].astype(int).to_numpy()
    start = runs["layer"].astype(int).to_numpy()
    scale = max(n_layers - 1, 1)
    out = pd.DataFrame({"k": k, "start": start, "end": start + k - 1, "relative_depth": start / scale,
                        "middle_depth": (start + (k - 1) / 2) / scale})
    for column in RUN_COLUMNS[5:]:
        out[column] = runs[column].to_numpy()
    return out.sort_values(["k", "start"], ignore_index=True)


def run_collapse(runs: pd.DataFrame, single: pd.DataFrame, n_layers: int, *, fragile: float = 3.0) -> pd.DataFrame:
    """Per run length, is the middle of the model still robust to deleting that many adjacent blocks?

    A run is in the middle when its first and last blocks lie within :data:`MIDDLE` of relative
    depth. The threshold is the stage rule's for one block
    (:func:`~stages_of_inference.stages.placement.place_stages`): ``fragile`` times the median KL
    of deleting one block. The middle stops being robust at the first ``k`` whose median middle
    run costs more than that, i.e. where deleting ``k`` blocks from the middle hurts as much as
    deleting one block the rule calls fragile.

    Args:
        runs: :func:`run_table`'s table.
        single: a sweep summary with the single-block deletions (``kind == "drop"``).
        n_layers: the model's number of blocks.
        fragile: the stage rule's factor.

    Returns:
        One row per ``k``: ``k``, ``middle_runs`` (how many), ``median_kl`` (over them),
        ``threshold``, ``additivity`` (``median_kl`` over ``k`` times the median KL of deleting
        one middle block: 1 where damage adds up, more where it compounds), ``robust``
        (``median_kl <= threshold``; missing where no run of that length fits in the middle).
        ``attrs["collapse_k"]``: the first ``k`` that is not robust, or ``None``.

    Example:
        >>> single = pd.DataFrame({"kind": ["drop"] * 9, "kl_nats": [5, 1, 1, 1, 1, 1, 1, 1, 4]})
        >>> runs = pd.DataFrame({"k": [2, 2, 3, 3], "start": [3, 4, 3, 4], "kl_nats": [2., 2.5, 4., 5.]})
        >>> out = run_collapse(runs, single, 9)
        >>> out[["k", "middle_runs", "median_kl", "robust"]].values.tolist(), out.attrs["collapse_k"]
        ([[2, 2, 2.25, True], [3, 2, 4.5, False]], 3)
    """
    kl = single.loc[single["kind"] == "drop", "kl_nats"].to_numpy(float)
    if not len(kl):
        raise ValueError("run_collapse needs the single-block deletions (kind 'drop') to set its threshold")
    threshold = fragile * max(float(np.median(kl)), 1e-12)
    scale = max(n_layers - 1, 1)
    low, high = MIDDLE
    in_middle = [low <= i / scale <= high for i in range(len(kl))]
    one_middle = float(np.median(kl[in_middle])) if any(in_middle) else float("nan")
    rows, collapse = [], None
    for k, group in runs.groupby("k", sort=True):
        middle = group[(group["start"] / scale >= low) & ((group["start"] + k - 1) / scale <= high)]
        median = float(middle["kl_nats"].median()) if len(middle) else float("nan")
        robust = pd.NA if not len(middle) else bool(median <= threshold)
        if robust is False and collapse is None:
            collapse = int(k)
        rows.append({"k": int(k), "middle_runs": len(middle), "median_kl": median, "threshold": threshold,
                     "additivity": median / (k * one_middle) if one_middle > 0 else float("nan"), "robust": robust})
    out = pd.DataFrame(rows, columns=["k", "middle_runs", "median_kl", "threshold", "additivity", "robust"])
    out["robust"] = out["robust"].astype("boolean")
    out.attrs["collapse_k"] = collapse
    return out
