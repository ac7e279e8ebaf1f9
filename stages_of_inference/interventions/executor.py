"""Many layer plans at once, sharing every common prefix: the sweep (:func:`evaluate_plans`).

The plans are organised as a trie on their block orders (:mod:`~stages_of_inference.interventions.trie`,
pure scheduling). The unmodified model is the trunk: it runs first, once per batch of sequences,
keeping the residual stream after every block and giving the reference. Every other plan branches
off the trunk where its order first differs and shares residuals with the plans it has a prefix in
common with; the schedule walks the trie depth first, a window of plan ends at a time, stacking
plans that run the same block at the same step into one block call (``stack_tokens``). Each
plan's final residual is unembedded a chunk of token positions at a time
(:mod:`~stages_of_inference.interventions.unembed`) and reduced at once to per-token metrics
(:mod:`stages_of_inference.metrics`); its logits are never stored. The model is reached only
through the model seam (:mod:`stages_of_inference.backends`); how the sweep executes is one
:class:`~stages_of_inference.interventions.options.EngineOptions`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from torch import Tensor

from stages_of_inference._tl import Model
from stages_of_inference._utils import check_tokens
from stages_of_inference._utils import progress as _progress
from stages_of_inference.backends import Embedded, ModelSeam, as_seam
from stages_of_inference.backends.state import exclusive
from stages_of_inference.backends.step import set_step
from stages_of_inference.batch import Tokens
from stages_of_inference.interventions import trie as trie_
from stages_of_inference.interventions.effects import EffectMeter, aggregate_effects
from stages_of_inference.interventions.forward import RETURN_TYPES, FwdHooks, check_plan, reordered, run_plan
from stages_of_inference.interventions.options import EngineOptions
from stages_of_inference.interventions.plan import LayerPlan, Step, step_layer, step_part, step_text
from stages_of_inference.interventions.unembed import Unembedding, make_unembedding
from stages_of_inference.metrics import (
    ROWS_AT_ONCE,
    LinearReference,
    NonFiniteError,
    ProbReference,
    TokenMetrics,
    logit_metrics,
)
from stages_of_inference.precision import autocast, check_model_precision, compute_dtype

__all__ = ["RETURN_TYPES", "SEM_METRICS", "BatchResult", "Evaluation", "Pooled", "aggregate", "block_count", "evaluate",
           "evaluate_plans", "iter_plan_batches", "label_plan_ids", "order_labels", "reordered", "run_plan"]

SUM_KEYS = ("kl_nats", "loss", "correct", "agree", "entropy_bits", "confidence")
"""The per-token metrics summed per plan (``correct`` and ``agree`` are booleans)."""


def block_count(plans: Sequence[LayerPlan], shared: bool = True) -> int:
    """Number of block executions needed per batch: with prefix sharing (the trie, trunk included)
    or without (every plan alone, plus the unmodified model once for the reference).

    Example:
        >>> from stages_of_inference import LayerPlan
        >>> plans = [LayerPlan.drop(4, i) for i in range(4)] + [LayerPlan.swap(4, i) for i in range(3)]
        >>> block_count(plans), block_count(plans, shared=False)
        (16, 28)
    """
    if not plans:
        return 0
    return trie_.block_count([p.order for p in plans], plans[0].n_layers, shared)


class _Ticker:
    """A progress bar advanced by hand (``stages_of_inference._utils.progress`` under the hood)."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self._it = iter(_progress(range(total), enabled, total=total, desc=desc))
        self._bar = self._it

    def tick(self) -> None:
        next(self._it, None)

    def close(self) -> None:
        for _ in self._it:
            pass
        close = getattr(self._bar, "close", None)
        if close is not None:
            close()


@dataclass
class BatchResult:
    """What the sweep produced for one batch of sequences (the unit of checkpointing).

    Attributes:
        index: batch number (``0, 1, ...``).
        sums: one row per distinct plan (``plan_id`` ``0..``, and the reference: ``plan_id == -1``)
            and sequence (``sequence``, its index in the whole token batch): ``n_tokens`` and
            float64 sums of each per-token metric over the sequence's scored positions.
        per_token: the per-token table, or ``None``.
        effects: with ``layer_effects``, the layer-effect sums
            (:class:`~stages_of_inference.interventions.effects.EffectMeter`), or ``None``.
    """

    index: int
    sums: pd.DataFrame
    per_token: pd.DataFrame | None
    effects: pd.DataFrame | None = None


def _unique_orders(seam: ModelSeam, plans: Sequence[LayerPlan]) -> tuple[list[tuple[Step, ...]], list[int]]:
    if isinstance(plans, LayerPlan):
        raise TypeError("plans must be a sequence of LayerPlan; wrap a single plan in a list")
    plans = list(plans)
    if not plans:
        raise ValueError("plans is empty: give at least one LayerPlan")
    orders: list[tuple[Step, ...]] = []
    index: dict[tuple[Step, ...], int] = {}
    pids: list[int] = []
    for plan in plans:
        order = check_plan(seam, plan).order
        if order not in index:
            index[order] = len(orders)
            orders.append(order)
        pids.append(index[order])
    return orders, pids



def iter_plan_batches(
    model: Model | ModelSeam,
    tokens: Tokens,
    plans: Sequence[LayerPlan],
    options: EngineOptions | None = None,
    *,
    fwd_hooks: FwdHooks = (),
    skip: frozenset[int] = frozenset(),
    first_sequence: int = 0,
) -> Iterator[BatchResult]:
    """The sweep one batch of sequences at a time (what :func:`evaluate_plans` aggregates).

    Plan ids in the results index the distinct orders of ``plans`` in first-seen order. Batches
    whose index is in ``skip`` are not computed (used to resume from a checkpoint). Sequences are
    numbered from ``first_sequence`` (a shard of a larger batch keeps its sequences' numbers).

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> from stages_of_inference import LayerPlan
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> out = list(iter_plan_batches(m, torch.tensor([[0, 1, 2, 3]] * 3), [LayerPlan.drop(2, 0)],
        ...                              EngineOptions(batch_size=2, progress=False)))
        >>> [b.index for b in out], out[0].sums[["plan_id", "sequence"]].values.tolist()
        ([0, 1], [[-1, 0], [-1, 1], [0, 0], [0, 1]])
    """
    seam = as_seam(model)
    options = options if options is not None else EngineOptions()
    check_model_precision(seam.W_U.dtype, options.precision, seam.device)
    tokens = check_tokens(seam.model, tokens)
    options.scored(tokens.shape[1])  # refuses a score_last the sequences cannot have, before any work
    orders, _ = _unique_orders(seam, plans)
    starts = list(range(0, tokens.shape[0], options.batch_size))
    todo = [(k, s) for k, s in enumerate(starts) if k not in skip]
    lay = trie_.layout(trie_.build_trie(orders), seam.n_layers)
    ticker = _Ticker(len(todo) * len(orders), options.progress, desc=f"{len(orders)} plans")
    try:
        for k, start in todo:
            batch = tokens[start : start + options.batch_size]
            with exclusive(seam.model), torch.inference_mode(), seam.hooks(fwd_hooks):
                try:
                    result = _run_batch(seam, batch, first_sequence + start, lay, len(orders), options, bool(fwd_hooks), ticker)
                finally:
                    set_step(seam.model, None)
            yield BatchResult(k, *result)
    finally:
        ticker.close()


def _own(x: Tensor) -> Tensor:
    """``x``, or a copy of it if it is a view into a larger tensor (which it would keep alive)."""
    return x.clone() if x.untyped_storage().nbytes() > x.numel() * x.element_size() else x


def _final_rows(seam: ModelSeam, residual: Tensor, scored: slice) -> Tensor:
    """The final-norm residual of the ``scored`` positions, one row per position (the norm runs on
    every position, so hooks on it see the whole sequence, as in the model's own forward).
    """
    normed = seam.final_norm(residual)
    return rearrange(normed[:, scored], "batch pos d_model -> (batch pos) d_model")


@dataclass
class _Reference:
    """The unmodified model's scores on one batch.

    Attributes:
        metrics: its per-token metrics (``kl_nats`` 0 and ``agree`` true: against itself).
        linear: the summary the KL of linear logits needs (:class:`LinearReference`), or ``None``.
        probs: its probabilities (:class:`ProbReference`), where the KL needs them whole (else ``None``).
    """

    metrics: TokenMetrics
    linear: LinearReference | None
    probs: ProbReference | None


def _reference(unembedding: Unembedding, weights: tuple[Tensor, Tensor], x_ref: Tensor, targets: Tensor, linear: bool,
               chunk_tokens: int, overwrite: bool, scratch: Tensor) -> _Reference:
    """Score the unmodified model's final rows ``x_ref``, a chunk of rows at a time."""
    n_rows = x_ref.shape[0]
    summaries: list[LinearReference] = []
    probs: list[ProbReference] = []
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, n_rows, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, n_rows))
        logits, row_max = unembedding(x_ref[rows])
        if linear:
            summaries.append(LinearReference.from_logits(logits, *weights))
        else:
            probs.append(ProbReference.from_logits(logits))
        m = logit_metrics(logits, targets[rows], overwrite=overwrite, scratch=scratch, row_max=row_max)
        m["kl_nats"] = torch.zeros(rows.stop - rows.start, dtype=torch.float32, device=x_ref.device)
        m["agree"] = torch.ones(rows.stop - rows.start, dtype=torch.bool, device=x_ref.device)
        for key, value in m.items():
            parts.setdefault(key, []).append(value)
    metrics = {key: torch.cat(values) for key, values in parts.items()}
    summary = None
    if linear:
        summary = LinearReference(*(torch.cat([getattr(s, f) for s in summaries]) for f in ("neg_entropy", "u", "c")),
                                  metrics["top1"])
    return _Reference(metrics, summary, None if linear else ProbReference.cat(probs))


@dataclass
class _Scorer:
    """Per-token metrics of final residual rows against the reference: of one plan, or of up to
    ``tiles`` plans stacked one after another (then the reference's rows are tiled to match).
    """

    unembedding: Unembedding
    targets: Tensor
    reference: _Reference
    chunk_tokens: int
    overwrite: bool
    scratch: Tensor
    tiles: int = 1
    _targets: Tensor = field(init=False, repr=False)
    _top1: Tensor = field(init=False, repr=False)
    _linear: LinearReference | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ref, t = self.reference, self.tiles
        self._targets, self._top1, self._linear = self.targets, ref.metrics["top1"], ref.linear
        if t > 1 and ref.linear is not None:
            lin = ref.linear
            self._targets, self._top1 = self.targets.repeat(t), self._top1.repeat(t)
            self._linear = LinearReference(lin.neg_entropy.repeat(t), lin.u.repeat(t, 1), lin.c.repeat(t), self._top1)

    def __call__(self, x: Tensor) -> TokenMetrics:
        parts: dict[str, list[Tensor]] = {}
        for start in range(0, x.shape[0], self.chunk_tokens):
            rows = slice(start, min(start + self.chunk_tokens, x.shape[0]))
            ref = self._linear[rows] if self._linear is not None else self.reference.probs[rows]
            logits, row_max = self.unembedding(x[rows])
            m = logit_metrics(logits, self._targets[rows], ref, self._top1[rows], resid=x[rows],
                              overwrite=self.overwrite, scratch=self.scratch, row_max=row_max)
            for key, value in m.items():
                parts.setdefault(key, []).append(value)
        return {key: torch.cat(values) for key, values in parts.items()}


@dataclass
class _Walk:
    """One batch's trie walk: the model, its embedded batch and trunk, and how plans are stacked."""

    seam: ModelSeam
    emb: Embedded
    fast: Any
    lay: trie_.Layout
    trunk: list[Tensor]
    lanes: int
    window_size: int
    stack_metrics: bool
    scored: slice
    precision: str = "fp32"
    effects: EffectMeter | None = None

    def block(self, item: Step, x: Tensor, step: int) -> Tensor:
        """Plan step ``item`` (a block, or one sublayer of it) on ``x`` at execution ``step``: by the
        fast path where it may run, else the block itself (under the precision's autocast).
        """
        layer, part = step_layer(item), step_part(item)
        if self.fast is not None and self.fast.allowed[layer]:
            return self.fast(layer, x, part)
        with autocast(self.precision, x.device):
            return self.seam.run_block(layer, x, self.emb, step, part)

    def leaves(self, score: _Scorer) -> Iterator[tuple[trie_.Node, TokenMetrics | None]]:
        """Every plan end with its metrics (``None``: the unmodified order, scored as the reference)."""
        n_layers = self.seam.n_layers
        kept: dict[int, Tensor] = {}

        def residual(node: trie_.Node) -> Tensor:
            depth = self.lay.trunk.get(node.index)
            return self.trunk[depth] if depth is not None else kept[node.index]

        for window in trie_.schedule(self.lay, self.window_size, self.lanes):
            for depth, runs in itertools.groupby(window.runs, key=lambda r: r.depth):
                for run in runs:
                    inputs = [residual(self.lay.parent[n.index]) for n in run.nodes]
                    outputs = self._run(run, inputs)
                    kept.update((n.index, out) for n, out in zip(run.nodes, outputs))
                    if self.effects is not None:
                        for n, x_in, out in zip(run.nodes, inputs, outputs):
                            self.effects.record(n.index, run.block, x_in, out)
                for index in window.free_after.get(depth, ()):
                    del kept[index]
            computed = [leaf for leaf in window.leaves if self.lay.trunk.get(leaf.index) != n_layers]
            scored = self._score(score, [_final_rows(self.seam, residual(leaf), self.scored) for leaf in computed])
            scores = {leaf.index: m for leaf, m in zip(computed, scored)}
            yield from ((leaf, scores.get(leaf.index)) for leaf in window.leaves)
            kept = {k: _own(v) for k, v in kept.items() if k in window.carry}

    def _run(self, run: trie_.Run, inputs: list[Tensor]) -> list[Tensor]:
        """One scheduled block call: stacked along the batch axis where the block takes the fast
        path (so no hook ever sees a stacked batch), else one call per input.
        """
        n_seq, step = self.emb.residual.shape[0], run.depth - 1
        if len(inputs) > 1 and self.fast is not None and self.fast.allowed[step_layer(run.block)]:
            return list(self.fast(step_layer(run.block), torch.cat(inputs), step_part(run.block)).split(n_seq))
        return [self.block(run.block, x, step) for x in inputs]

    def _score(self, score: _Scorer, rows: list[Tensor]) -> list[TokenMetrics]:
        """Metrics of each computed leaf's final rows, reduced as one stack where allowed."""
        if self.stack_metrics and len(rows) > 1:
            stacked = score(torch.cat(rows))
            n = rows[0].shape[0]
            return [{key: v[k * n : (k + 1) * n] for key, v in stacked.items()} for k in range(len(rows))]
        return [score(x) for x in rows]


def _sums(pid: int, m: TokenMetrics, n_seq: int, first_sequence: int) -> dict[str, np.ndarray]:
    """One plan's per-token metrics reduced to float64 sums per sequence."""
    per_seq = m["loss"].shape[0] // n_seq
    out = {"plan_id": np.full(n_seq, pid, dtype=np.int64),
           "sequence": np.arange(first_sequence, first_sequence + n_seq, dtype=np.int64),
           "n_tokens": np.full(n_seq, per_seq, dtype=np.int64)}
    for key in SUM_KEYS:
        out[f"{key}_sum"] = m[key].double().view(n_seq, per_seq).sum(dim=1).cpu().numpy()
    return out


def _check_finite(sums: dict[str, np.ndarray], seam: ModelSeam, batch: Tensor, order: tuple[Step, ...],
                  precision: str = "fp32") -> None:
    """Refuse a plan whose metrics are not finite, naming where the model first produced a NaN or
    an infinity (so no sum or mean ever skips one).
    """
    if all(np.isfinite(v).all() for k, v in sums.items() if k.endswith("_sum")):
        return
    with autocast(precision, seam.device):
        where = _first_nonfinite_block(seam, batch, order)
    hint = "check the model's weights"
    if precision != "fp32":
        hint += f", or run with precision='fp32' (this ran in {precision})"
    steps = ", ".join(map(step_text, order))
    raise NonFiniteError(f"the plan [{steps}] gives NaN or infinite metrics: {where}; {hint} "
                         "(no number of this sweep is returned)")


def _first_nonfinite_block(seam: ModelSeam, batch: Tensor, order: tuple[Step, ...]) -> str:
    """Run ``order`` again, block by block, and say where the residual first stops being finite."""
    emb = seam.embed(batch)
    x = emb.residual
    if not bool(torch.isfinite(x).all()):
        return "the embeddings are already not finite"
    for step, item in enumerate(order):
        x = seam.run_block(step_layer(item), x, emb, step, step_part(item))
        if not bool(torch.isfinite(x).all()):
            return f"block {step_text(item)} (step {step} of the plan) first outputs non-finite values"
    return "every block's output is finite: the final norm or the unembedding produces them"


def _order_of(lay: trie_.Layout, leaf: trie_.Node) -> tuple[Step, ...]:
    """The order of steps that ends at ``leaf``."""
    order: list[Step] = []
    node: trie_.Node | None = leaf
    while node is not None and lay.block[node.index] is not None:
        order.append(lay.block[node.index])
        node = lay.parent[node.index]
    return tuple(reversed(order))


def _per_token_table(results: list[TokenMetrics], reference: TokenMetrics, targets: Tensor, first_sequence: int,
                     n_seq: int, scored: slice) -> pd.DataFrame:
    """The per-token table of one batch: one row per plan and scored position."""
    n_rows = targets.shape[0]
    positions = np.arange(scored.start, scored.stop)
    seq = np.repeat(np.arange(first_sequence, first_sequence + n_seq), len(positions))
    pos = np.tile(positions, n_seq)
    target_np, ref_loss, ref_top1 = targets.cpu().numpy(), reference["loss"].cpu().numpy(), reference["top1"].cpu().numpy()
    frames = []
    for pid, m in enumerate(results):
        loss = m["loss"].cpu().numpy()
        frames.append(pd.DataFrame({
            "plan_id": np.full(n_rows, pid, dtype=np.int64), "sequence": seq, "position": pos, "token": target_np,
            "top1": m["top1"].cpu().numpy(), "top1_original": ref_top1, "kl_nats": m["kl_nats"].cpu().numpy(),
            "loss": loss, "loss_original": ref_loss, "loss_delta": loss - ref_loss,
            "entropy_bits": m["entropy_bits"].cpu().numpy(), "confidence": m["confidence"].cpu().numpy(),
            "correct": m["correct"].cpu().numpy(), "agree": m["agree"].cpu().numpy(),
        }))
    return pd.concat(frames, ignore_index=True)


def _prepare(seam: ModelSeam, batch: Tensor, lay: trie_.Layout, options: EngineOptions, hooked: bool,
             targets: Tensor, scored: slice) -> tuple[_Walk, _Scorer]:
    """Embed a batch, run the trunk, score the reference, and size the stacks and buffers."""
    n_seq, seq_len = batch.shape
    emb = seam.embed(batch)
    low = None if options.precision == "fp32" else compute_dtype(options.precision)  # None: the weights' own dtype
    fast = None if hooked else seam.fast_blocks(emb, options.fast_path, low)
    # The unembedding module runs (and its hook points fire) when a hook could see it. Logits
    # linear in the final residual (no soft-cap, no such hook, fp32 or wider, computed in fp32)
    # need only a summary of the reference per row for the KL (metrics.LinearReference).
    via_module = hooked or seam.has_hooks(seam.unembed_module)
    linear = (not via_module and not seam.softcap > 0 and seam.W_U.dtype in (torch.float32, torch.float64)
              and options.precision == "fp32")
    # Plans whose blocks take the fast path run up to `lanes` at a time stacked into one block
    # call; a window holds twice as many plan ends (neighbouring plans often run different blocks
    # at a step: a deletion's tail runs block d + 1 at step d, a swap's tail block d).
    lanes = max(1, options.stack_tokens_for(seam.device) // (n_seq * seq_len)) if fast is not None else 1
    walk = _Walk(seam, emb, fast, lay, [emb.residual], lanes, 2 * lanes if lanes > 1 else 1, linear and lanes > 1,
                 scored, options.precision)
    for layer in range(seam.n_layers):  # the trunk: the unmodified model, every residual kept
        walk.trunk.append(walk.block(layer, walk.trunk[-1], layer))
    if options.layer_effects:
        walk.effects = EffectMeter(walk.trunk, scored)
    n_rows = targets.shape[0]
    chunk = min(options.chunk_tokens, n_rows * (walk.window_size if walk.stack_metrics else 1))
    scratch = emb.residual.new_empty((min(chunk, ROWS_AT_ONCE), seam.d_vocab), dtype=torch.float32)
    scale = seam.logit_scale  # the family's output scale, folded into the weights the linear paths use
    weights = (seam.W_U, seam.b_U) if scale == 1.0 else (seam.W_U * scale, seam.b_U * scale)
    unembedding = make_unembedding(seam.unembed_module, *weights, seam.softcap, via_module, chunk,
                                   options.unembed_block, options.precision, module_scale=scale)
    reference = _reference(unembedding, weights, _final_rows(seam, walk.trunk[-1], scored), targets, linear,
                           options.chunk_tokens, not via_module, scratch)
    tiles = walk.window_size if walk.stack_metrics else 1
    return walk, _Scorer(unembedding, targets, reference, options.chunk_tokens, not via_module, scratch, tiles)


def _run_batch(seam: ModelSeam, batch: Tensor, first_sequence: int, lay: trie_.Layout, n_plans: int,
               options: EngineOptions, hooked: bool,
               ticker: _Ticker) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """Every plan on one batch: float64 sums per plan (and the per-token table and the layer-effect
    sums, if asked).
    """
    positions = options.scored(batch.shape[1])
    targets = rearrange(batch[:, positions.start + 1 : positions.stop + 1], "batch pos -> (batch pos)")
    walk, score = _prepare(seam, batch, lay, options, hooked, targets, positions)
    reference = score.reference.metrics
    n_seq = batch.shape[0]
    sums_rows: list[dict[str, np.ndarray]] = [_sums(-1, reference, n_seq, first_sequence)] + [{}] * n_plans
    _check_finite(sums_rows[0], seam, batch, tuple(range(seam.n_layers)), options.precision)
    results: list[TokenMetrics] = [reference] * n_plans
    scored = positions.stop - positions.start
    effects = None if walk.effects is None else [walk.effects.reference_rows(first_sequence, scored)]
    for leaf, m in walk.leaves(score):
        if effects is not None:
            effects.append(walk.effects.rows(lay, leaf, first_sequence, scored))
        m = reference if m is None else m
        for pid in leaf.ends:
            sums_rows[pid + 1] = _sums(pid, m, n_seq, first_sequence)
            _check_finite(sums_rows[pid + 1], seam, batch, _order_of(lay, leaf), options.precision)
            if options.per_token:
                results[pid] = m
            ticker.tick()
    del walk, score  # the buffers and residuals, before the table is built
    table = None
    if options.per_token:
        table = _per_token_table(results, reference, targets, first_sequence, batch.shape[0], positions)
    sums = pd.DataFrame({key: np.concatenate([row[key] for row in sums_rows]) for key in sums_rows[0]})
    return sums, table, None if effects is None else pd.concat(effects, ignore_index=True)


@dataclass(frozen=True)
class Pooled:
    """Per-plan means pooled over every scored token of all batches.

    Attributes:
        summary: one row per distinct order (``plan_id`` order): its JSON, label, kind and the
            metrics with their standard errors over sequences (:func:`aggregate`).
        reference: the unmodified model's numbers on the same tokens: ``loss``, ``accuracy``,
            ``entropy_bits``, ``confidence``, ``n_tokens``.
    """

    summary: pd.DataFrame
    reference: dict[str, float]


def aggregate(orders: Sequence[tuple[Step, ...]], n_layers: int, batches: Sequence[BatchResult]) -> Pooled:
    """Means over every scored token of all batches, one row per distinct order (``plan_id``), and
    their standard errors over sequences (``<metric>_sem``: the standard error of the
    per-sequence means; 0 for a single sequence), with the unmodified model's numbers.

    Deterministic: the same batch results always give bit-identical numbers, whether they were just
    computed or read back from a checkpoint.
    """
    if not batches:
        raise ValueError("no batch results to aggregate")
    per_seq = pd.concat([b.sums for b in sorted(batches, key=lambda b: b.index)], ignore_index=True)
    total = per_seq.groupby("plan_id", sort=True).sum()
    means = {key: total[f"{key}_sum"] / total["n_tokens"].astype(np.float64) for key in SUM_KEYS}
    ref = {key: float(means[key].loc[-1]) for key in SUM_KEYS}
    sems = _sems(per_seq, ref["correct"])
    rows = []
    for pid, order in enumerate(orders):
        plan = LayerPlan(order=order, n_layers=n_layers)
        accuracy = float(means["correct"].loc[pid])
        loss = float(means["loss"].loc[pid])
        rows.append({
            "plan": plan.to_json(),
            "label": plan.label,
            "kind": plan.kind,
            "kl_nats": float(means["kl_nats"].loc[pid]),
            "loss": loss,
            "loss_delta": loss - ref["loss"],
            "accuracy": accuracy,
            "relative_accuracy": accuracy / ref["correct"] if ref["correct"] > 0 else float("nan"),
            "top1_agreement": float(means["agree"].loc[pid]),
            "entropy_bits": float(means["entropy_bits"].loc[pid]),
            "confidence": float(means["confidence"].loc[pid]),
            "n_tokens": int(total["n_tokens"].loc[pid]),
            **{f"{metric}_sem": float(sems[metric].loc[pid]) for metric in SEM_METRICS},
        })
    reference = {"loss": ref["loss"], "accuracy": ref["correct"], "entropy_bits": ref["entropy_bits"],
                 "confidence": ref["confidence"], "n_tokens": int(total["n_tokens"].loc[-1])}
    return Pooled(pd.DataFrame(rows), reference)


def label_plan_ids(table: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its ``plan_id`` column replaced by the columns of ``labels`` (one row per
    plan id, indexed by it; -1 is the unmodified model), put in front: the one place plan ids
    become what a reader sees.

    Example:
        >>> labels = pd.DataFrame({"kind": ["none", "drop"]}, index=[-1, 0])
        >>> label_plan_ids(pd.DataFrame({"plan_id": [0, -1, 0], "x": [1, 2, 3]}), labels).values.tolist()
        [['drop', 1], ['none', 2], ['drop', 3]]
    """
    pid = table["plan_id"].to_numpy()
    unknown = sorted(set(np.unique(pid).tolist()) - set(labels.index.tolist()))
    if unknown:
        raise ValueError(f"plan ids {unknown[:5]} have no label")
    front = labels.loc[pid].reset_index(drop=True)
    return pd.concat([front, table.drop(columns="plan_id").reset_index(drop=True)], axis=1)


def order_labels(orders: Sequence[tuple[Step, ...]], n_layers: int) -> pd.DataFrame:
    """Each distinct order's ``plan`` (JSON) and ``label``, indexed by plan id; -1 the unmodified
    model (``plan`` ``None``).
    """
    plans = [LayerPlan(order=o, n_layers=n_layers) for o in orders]
    return pd.DataFrame({"plan": [None] + [p.to_json() for p in plans],
                         "label": ["identity (reference)"] + [p.label for p in plans]}, index=range(-1, len(plans)))


SEM_METRICS = ("kl_nats", "loss", "loss_delta", "accuracy", "relative_accuracy", "top1_agreement", "entropy_bits")
"""The summary columns that get a standard error over sequences (``<metric>_sem``)."""


def _sems(per_seq: pd.DataFrame, ref_accuracy: float) -> dict[str, pd.Series]:
    """Per plan, the standard error over sequences of each metric's per-sequence mean (the loss
    change against the reference's mean on the same sequence; relative accuracy as accuracy over
    the reference's pooled accuracy).
    """
    n = per_seq["n_tokens"].astype(np.float64)
    seq_means = pd.DataFrame({key: per_seq[f"{key}_sum"] / n for key in SUM_KEYS})
    seq_means["plan_id"], seq_means["sequence"] = per_seq["plan_id"], per_seq["sequence"]
    ref_loss = seq_means[seq_means["plan_id"] == -1].set_index("sequence")["loss"]
    seq_means["loss_delta"] = seq_means["loss"] - ref_loss.reindex(seq_means["sequence"]).to_numpy()
    grouped = seq_means.groupby("plan_id", sort=True)
    count = grouped.size()
    std = grouped[["kl_nats", "loss", "loss_delta", "correct", "agree", "entropy_bits"]].std(ddof=1)
    sem = std.div(np.sqrt(count), axis=0).where(count > 1, 0.0)
    relative = sem["correct"] / ref_accuracy if ref_accuracy > 0 else sem["correct"] * np.nan
    return {"kl_nats": sem["kl_nats"], "loss": sem["loss"], "loss_delta": sem["loss_delta"], "accuracy": sem["correct"],
            "relative_accuracy": relative, "top1_agreement": sem["agree"], "entropy_bits": sem["entropy_bits"]}


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured.

    Attributes:
        summary: one row per plan, in the order given: ``plan`` (:meth:`LayerPlan.to_json`),
            ``label``, ``kind``, ``kl_nats``, ``loss``, ``loss_delta``, ``accuracy``,
            ``relative_accuracy``, ``top1_agreement``, ``entropy_bits``, ``confidence``,
            ``n_tokens`` and the standard errors over sequences (``<metric>_sem``).
        reference: the unmodified model's ``loss``, ``accuracy``, ``entropy_bits``,
            ``confidence`` and ``n_tokens`` on the same tokens.
        per_token: with ``per_token``: ``plan``, ``sequence``, ``position`` (the predicting
            position), ``token`` (the true next token), ``top1``, ``top1_original``, ``kl_nats``,
            ``loss``, ``loss_original``, ``loss_delta``, ``entropy_bits``, ``confidence``,
            ``correct``, ``agree``; else ``None``.
        layer_effects: with ``layer_effects``: one row per plan and block it ran off the
            unmodified order (``plan``, ``label``, ``step``, ``block``, ``relative_change``,
            ``relative_change_sem``, ``relative_size``, ``cosine``; ``plan`` ``None``: the
            unmodified model's blocks); else ``None``.
    """

    summary: pd.DataFrame
    reference: dict[str, float]
    per_token: pd.DataFrame | None = None
    layer_effects: pd.DataFrame | None = None


def evaluate(
    model: Model | ModelSeam,
    tokens: Tokens,
    plans: Sequence[LayerPlan],
    options: EngineOptions | None = None,
    *,
    fwd_hooks: FwdHooks = (),
    **settings: Any,
) -> Evaluation:
    """Evaluate many layer plans against the unmodified model, sharing every common prefix.

    Metrics (:mod:`stages_of_inference.metrics`, fp32) are taken on the scored positions
    ``1 .. T-2`` of every sequence and pooled over all of them: KL(original || plan) in nats, the
    plan's next-token loss and its difference from the original's, top-1 accuracy and its ratio to
    the original's, top-1 agreement with the original, entropy in bits and top-1 probability.
    Peak memory holds one batch's reference (log-probabilities, or a ``d_model``-sized summary per
    token), at most ``stack_tokens / (batch x pos)`` residuals per trie depth and one chunk of
    logits; it does not grow with the number of plans.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` (or any model seam, :mod:`stages_of_inference.backends`).
        tokens: ``[batch, pos]`` token ids, BOS first, at least 3 positions.
        plans: layer plans for ``model.cfg.n_layers`` blocks (duplicates are computed once).
        options: how the sweep executes (:class:`~stages_of_inference.interventions.options.EngineOptions`);
            or give its fields as keywords (``settings``), not both:
        batch_size: sequences per trie pass.
        chunk_tokens: token positions unembedded and reduced at a time.
        per_token: also return the per-token table.
        progress: show a progress bar.
        fast_path: run blocks by the backend's fast path (the block's function without
            TransformerLens' per-call weight copies; equal to fp32 rounding) wherever nothing
            could observe the difference: no ``fwd_hooks``, no hook on the block, a block
            configuration it reproduces. ``False`` always runs the blocks.
        stack_tokens: with the fast path, plans that run the same block at the same step are
            stacked along the batch axis into one block call of at most this many token
            positions (``batch x pos`` each), and their logits are reduced together: larger matrix
            products, fewer calls. ``None``: :data:`STACK_TOKENS_CPU` on a CPU,
            :data:`STACK_TOKENS_ACCELERATOR` elsewhere. Batches of at least half this size run
            one plan at a time; blocks that take the TransformerLens path are never stacked, so
            hooks always see the batch they were given.
        unembed_block: vocabulary columns unembedded at a time.
        precision: the dtype of the products (:mod:`stages_of_inference.precision`).
        layer_effects: also measure how each plan changes what its blocks write
            (:mod:`~stages_of_inference.interventions.effects`).
        score_last: score only the last this many of the positions ``1 .. T-2`` (an answer, a
            continuation); the others are never unembedded. ``None``: all of them.
        fwd_hooks: TransformerLens hooks active for every plan *and* the reference run (for
            example an ablation whose effect of reordering is to be measured).
        **settings: the fields of ``EngineOptions`` as keywords (the arguments listed above).

    Returns:
        An :class:`Evaluation`.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> from stages_of_inference import LayerPlan
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=3, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> plans = [LayerPlan.identity(3), LayerPlan.drop(3, 1), LayerPlan.swap(3, 0)]
        >>> ev = evaluate(m, torch.tensor([[0, 1, 2, 3, 4]]), plans, progress=False)
        >>> ev.summary["label"].tolist(), float(ev.summary["kl_nats"].iloc[0]), ev.reference["n_tokens"]
        (['identity', 'drop 1', 'swap 0<->1'], 0.0, 3)
    """
    seam = as_seam(model)
    options = EngineOptions.from_settings(options, settings)
    orders, pids = _unique_orders(seam, plans)
    batches = list(iter_plan_batches(seam, tokens, plans, options, fwd_hooks=fwd_hooks))
    pooled = aggregate(orders, seam.n_layers, batches)
    summary = pooled.summary.iloc[pids].reset_index(drop=True)
    labels = order_labels(orders, seam.n_layers)
    effects = None
    if options.layer_effects:
        effects = label_plan_ids(aggregate_effects([b.effects for b in batches if b.effects is not None]), labels)
    per_token = None
    if options.per_token:
        table = pd.concat([b.per_token for b in batches if b.per_token is not None], ignore_index=True)
        per_token = label_plan_ids(table, labels[["plan"]])
    return Evaluation(summary, pooled.reference, per_token, effects)


def evaluate_plans(
    model: Model | ModelSeam,
    tokens: Tokens,
    plans: Sequence[LayerPlan],
    options: EngineOptions | None = None,
    *,
    fwd_hooks: FwdHooks = (),
    **settings: Any,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`evaluate`'s summary table (with ``per_token=True``, the pair ``(summary,
    per_token)``): the short form when the reference's numbers and layer effects are not needed.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> from stages_of_inference import LayerPlan
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=3, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> df = evaluate_plans(m, torch.tensor([[0, 1, 2, 3, 4]]), [LayerPlan.drop(3, 1)], progress=False)
        >>> df["label"].tolist()
        ['drop 1']
    """
    result = evaluate(model, tokens, plans, options, fwd_hooks=fwd_hooks, **settings)
    return (result.summary, result.per_token) if result.per_token is not None else result.summary
