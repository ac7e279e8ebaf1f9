"""Executing layer plans: one plan (:func:`run_plan`), the model's own forward under a plan
(:func:`reordered`), and many plans at once, sharing every common prefix (:func:`evaluate_plans`).

Executing a plan mirrors ``HookedTransformer.forward`` of TransformerLens 3.9: the embedding (and
learned positions, for models that have them) once, then ``model.blocks[i]`` for each ``i`` of the
plan, each with the shortformer positions and attention mask the forward pass would give it, then
the final norm and the unembedding (and the logit soft-cap, for models that have one). Blocks are
the model's own modules, so every hook keeps its TransformerLens name and fires on the block it
names, wherever (and however often) that block runs.

The sweep (:func:`evaluate_plans`) organises the plans as a trie on their block orders. The
unmodified model is the trunk: it runs first, once per batch of sequences, keeping the residual
stream after every block and giving the reference log-probabilities. Every other plan branches off
the trunk where its order first differs, and shares residuals with the plans it has a prefix in
common with; the trie is walked depth first, so at most one residual per depth is alive (with
stacked plans, ``stack_tokens``, those of one window of plans). Each plan's final residual is
unembedded a chunk of token positions at a time and reduced at once to per-token metrics
(:mod:`stages_of_inference.metrics`); its logits are never stored.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.utilities import apply_softcap, get_device_for_block_index

from stages_of_inference._utils import check_model, check_tokens
from stages_of_inference._utils import progress as _progress
from stages_of_inference.interventions.fastpath import FastBlocks, _has_hooks
from stages_of_inference.interventions.plan import LayerPlan
from stages_of_inference.interventions.step import get_step, set_step
from stages_of_inference.metrics import DEFAULT_CHUNK_TOKENS, ROWS_AT_ONCE, LinearReference, log_probs, logit_metrics

RETURN_TYPES = ("logits", "loss", "both", None)
"""The ``return_type`` values :func:`run_plan` accepts (as ``HookedTransformer.forward``)."""

FwdHooks = Sequence[tuple[Any, Callable[..., Any]]]

UNEMBED_BLOCK = 1024
"""Vocabulary columns the sweep unembeds at a time (see ``_run_batch``)."""

STACK_TOKENS_CPU = 1024
"""Default ``stack_tokens`` of the sweep on a CPU: the largest block call before the products
stop getting faster on the 2-core machine the library is developed on (docs/benchmarks.md)."""

STACK_TOKENS_ACCELERATOR = 8192
"""Default ``stack_tokens`` of the sweep on a GPU or other accelerator, where larger products keep
getting faster."""

# per-token metrics summed per plan; "correct" and "agree" are booleans
_SUM_KEYS = ("kl_nats", "loss", "correct", "agree", "entropy_bits", "confidence")


# --------------------------------------------------------------------------- low-level pieces
def _check_plan(model: HookedTransformer, plan: Any) -> LayerPlan:
    if not isinstance(plan, LayerPlan):
        raise TypeError(
            f"expected a LayerPlan, got {type(plan).__name__}; build one with e.g. "
            "LayerPlan.drop(model.cfg.n_layers, i) or LayerPlan(order=(...), n_layers=model.cfg.n_layers)"
        )
    return plan.check(model.cfg.n_layers)


# model -> its own blocks in their original order, while a `reordered` block is active on it
_ORIGINAL_BLOCKS: weakref.WeakKeyDictionary[HookedTransformer, tuple[nn.Module, ...]] = weakref.WeakKeyDictionary()


def _blocks(model: HookedTransformer) -> Sequence[nn.Module]:
    """The model's own blocks in their original order, also while :func:`reordered` is active."""
    original = _ORIGINAL_BLOCKS.get(model)
    return original if original is not None else tuple(model.blocks)


@dataclass
class _Embedded:
    residual: Tensor
    shortformer_pos_embed: Tensor | None
    attention_mask: Tensor | None


def _embed(model: HookedTransformer, tokens: Tensor) -> _Embedded:
    residual, _, shortformer, mask = model.input_to_embed(tokens)
    return _Embedded(residual, shortformer, mask)


def _run_block(
    model: HookedTransformer, emb: _Embedded, step: int, layer: int, residual: Tensor,
    fast: FastBlocks | None = None,
) -> Tensor:
    """Block ``layer`` at execution ``step`` of a plan; by the fast path if ``fast`` allows it."""
    if fast is not None and fast.allowed[layer]:
        return fast(layer, residual)
    device = get_device_for_block_index(layer, model.cfg)
    shortformer = emb.shortformer_pos_embed
    if shortformer is not None:
        shortformer = shortformer.to(device)
    set_step(model, (step, layer))
    return _blocks(model)[layer](
        residual.to(device), shortformer_pos_embed=shortformer, attention_mask=emb.attention_mask
    )


def _fast_blocks(model: HookedTransformer, emb: _Embedded, hooked: bool, enabled: bool) -> FastBlocks | None:
    """The fast path for a batch (:mod:`~stages_of_inference.interventions.fastpath`): none if
    disabled, if the caller passed hooks, or with a padding mask or shortformer positions;
    otherwise for each block its
    :func:`~stages_of_inference.interventions.fastpath.fast_path_blocker` finds nothing in the way of."""
    if not enabled or hooked or emb.attention_mask is not None or emb.shortformer_pos_embed is not None:
        return None
    return FastBlocks(model, _blocks(model), emb.residual.shape[1])


def _row_max(logits: Float[Tensor, "n d_vocab"], block_max: Float[Tensor, "n_blocks n"]) -> tuple[Tensor, Tensor]:
    """The largest logit of each row and its index (the first, on ties, as ``Tensor.max(dim)``),
    from ``block_max``, the largest of each row in each block of ``UNEMBED_BLOCK`` columns: the
    first block holding the row's maximum is searched, not the whole row."""
    top, block = block_max.max(dim=0)  # the first block with the maximum
    width = min(UNEMBED_BLOCK, logits.shape[1])
    start = block * UNEMBED_BLOCK
    cols = (start.unsqueeze(1) + torch.arange(width, device=logits.device)).clamp_(max=logits.shape[1] - 1)
    # past the vocabulary's end, the last column repeats: it cannot come before its first copy
    return top, start + logits.gather(1, cols).argmax(dim=1)


def _final_norm(model: HookedTransformer, residual: Tensor) -> Tensor:
    residual = residual.to(get_device_for_block_index(model.cfg.n_layers - 1, model.cfg))
    if model.cfg.normalization_type is not None:
        residual = model.ln_final(residual)
    return residual


# --------------------------------------------------------------------------- one plan
def run_plan(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    plan: LayerPlan,
    fwd_hooks: FwdHooks = (),
    return_type: Literal["logits", "loss", "both"] | None = "logits",
) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, ""] | tuple[Tensor, Tensor] | None:
    """Run ``tokens`` through ``model`` executing the blocks in ``plan``'s order.

    The embedding runs once, then each block of the plan, then the final norm and unembedding,
    exactly as ``HookedTransformer.forward`` does for the unmodified order. ``fwd_hooks`` are
    TransformerLens ``(name, function)`` pairs; a hook on ``blocks.{i}....`` fires whenever block
    ``i`` runs (once per occurrence in the plan, never for a deleted block). Runs under
    ``torch.inference_mode()``; for gradients, use :func:`reordered` with the model's own forward.

    Args:
        model: a ``HookedTransformer``.
        tokens: token ids ``[batch, pos]``.
        plan: the block order, for ``model.cfg.n_layers`` blocks.
        fwd_hooks: forward hooks attached for this call only.
        return_type: ``"logits"``, ``"loss"`` (TransformerLens' mean next-token loss), ``"both"``
            (a ``(logits, loss)`` pair) or ``None``.

    Returns:
        As ``HookedTransformer.forward`` with the same ``return_type``.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> from stages_of_inference import LayerPlan, run_plan
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=3, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> tokens = torch.tensor([[0, 1, 2, 3]])
        >>> bool(torch.allclose(run_plan(m, tokens, LayerPlan.identity(3)), m(tokens), atol=1e-6))
        True
        >>> run_plan(m, tokens, LayerPlan.drop(3, 1)).shape
        torch.Size([1, 4, 5])
    """
    model = check_model(model)
    plan = _check_plan(model, plan)
    tokens = check_tokens(model, tokens, min_len=1)
    if return_type not in RETURN_TYPES:
        raise ValueError(f"unknown return_type {return_type!r}; allowed: {RETURN_TYPES}")
    with torch.inference_mode(), model.hooks(fwd_hooks=list(fwd_hooks)):
        try:
            emb = _embed(model, tokens)
            residual = emb.residual
            for step, layer in enumerate(plan.order):
                residual = _run_block(model, emb, step, layer, residual)
        finally:
            set_step(model, None)
        residual = _final_norm(model, residual)
        if return_type is None:
            return None
        logits = apply_softcap(model.unembed(residual), model.cfg.output_logits_soft_cap)
        if return_type == "logits":
            return logits
        loss = model.loss_fn(logits, tokens, emb.attention_mask)
        return loss if return_type == "loss" else (logits, loss)


# --------------------------------------------------------------------------- the model's own forward
class _Chain(nn.Module):
    """Several blocks run one after another in one slot of ``model.blocks`` (plans longer than the
    model, or models spread over several devices)."""

    def __init__(self, model: HookedTransformer, layers: Sequence[int]) -> None:
        super().__init__()
        self._cfg = model.cfg
        self._layers = tuple(layers)
        self._run = [_blocks(model)[i] for i in layers]  # a plain list: not registered as submodules

    def forward(
        self,
        resid_pre: Tensor,
        shortformer_pos_embed: Tensor | None = None,
        past_kv_cache_entry: Any = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        if past_kv_cache_entry is not None and len(self._layers) > 1:
            raise NotImplementedError(
                "generation with a key-value cache is not supported under a plan longer than the model"
            )
        residual = resid_pre
        for layer, block in zip(self._layers, self._run):
            device = get_device_for_block_index(layer, self._cfg)
            pos = None if shortformer_pos_embed is None else shortformer_pos_embed.to(device)
            residual = block(
                residual.to(device),
                shortformer_pos_embed=pos,
                past_kv_cache_entry=past_kv_cache_entry,
                attention_mask=attention_mask,
            )
        return residual

    def extra_repr(self) -> str:
        return f"layers={self._layers}"


@contextlib.contextmanager
def reordered(model: HookedTransformer, plan: LayerPlan) -> Iterator[HookedTransformer]:
    """Make the model's own ``forward``, ``run_with_hooks`` and ``run_with_cache`` follow ``plan``.

    Inside the block, ``model.blocks`` is a list of the model's own block modules in the plan's
    order (the same objects, so hook names are unchanged and hooks fire on the block they name);
    on exit, exceptions included, the original list is put back. ``start_at_layer`` /
    ``stop_at_layer`` count steps of the plan. Plans longer than the model run their surplus steps
    in the last slot. Inside, :func:`stages_of_inference.hooks.current_step` tells hooks the
    execution step. Nested ``reordered`` blocks use the original block indices. Do not save or move
    the model inside the block. Caches from ``run_with_cache`` hold, for a repeated block, its last
    occurrence, and no entries for deleted blocks.

    Args:
        model: a ``HookedTransformer``.
        plan: the block order, for ``model.cfg.n_layers`` blocks.

    Yields:
        The model itself.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> from stages_of_inference import LayerPlan, reordered, run_plan
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=3, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> tokens = torch.tensor([[0, 1, 2, 3]])
        >>> with reordered(m, LayerPlan.swap(3, 0)):
        ...     logits, cache = m.run_with_cache(tokens)
        >>> bool(torch.allclose(logits, run_plan(m, tokens, LayerPlan.swap(3, 0)), atol=1e-6))
        True
        >>> len(m.blocks)
        3
    """
    model = check_model(model)
    plan = _check_plan(model, plan)
    n = model.cfg.n_layers
    original = _blocks(model)
    outermost = model not in _ORIGINAL_BLOCKS
    previous_blocks = model.blocks
    previous_step = get_step(model)
    state = {"step": -1}
    multi_device = model.cfg.n_devices > 1
    order = plan.order
    slots: list[nn.Module] = []
    for k in range(min(len(order), n)):
        layers = order[k:] if (k == n - 1 and len(order) > n) else (order[k],)
        if len(layers) == 1 and not multi_device:
            slots.append(original[layers[0]])
        else:
            slots.append(_Chain(model, layers))

    def on_embed(module: nn.Module, args: Any) -> None:
        state["step"] = -1

    handles = [model.embed.register_forward_pre_hook(on_embed)]
    for layer in sorted(set(order)):
        def on_block(module: nn.Module, args: Any, layer: int = layer) -> None:
            state["step"] += 1
            set_step(model, (state["step"], layer))
        handles.append(original[layer].register_forward_pre_hook(on_block))
    try:
        _ORIGINAL_BLOCKS[model] = tuple(original)
        model.blocks = nn.ModuleList(slots)
        yield model
    finally:
        model.blocks = previous_blocks
        for handle in handles:
            handle.remove()
        set_step(model, previous_step)
        if outermost:
            _ORIGINAL_BLOCKS.pop(model, None)


# --------------------------------------------------------------------------- many plans: the trie
class _Node:
    __slots__ = ("children", "ends")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.ends: list[int] = []


def _build_trie(orders: Sequence[tuple[int, ...]]) -> _Node:
    root = _Node()
    for pid, order in enumerate(orders):
        node = root
        for layer in order:
            node = node.children.setdefault(layer, _Node())
        node.ends.append(pid)
    return root


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
    n = plans[0].n_layers
    orders = [tuple(range(n))] + [p.order for p in plans]
    if not shared:
        return sum(len(o) for o in orders)
    seen: set[tuple[int, ...]] = set()
    for order in orders:
        for k in range(1, len(order) + 1):
            seen.add(order[:k])
    return len(seen)


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
        sums: one row per distinct plan (``plan_id`` ``0..``) and the reference (``plan_id == -1``):
            ``n_tokens`` and float64 sums of each per-token metric.
        per_token: the per-token table, or ``None``.
    """

    index: int
    sums: pd.DataFrame
    per_token: pd.DataFrame | None


def _unique_orders(model: HookedTransformer, plans: Sequence[LayerPlan]) -> tuple[list[tuple[int, ...]], list[int]]:
    if isinstance(plans, LayerPlan):
        raise TypeError("plans must be a sequence of LayerPlan; wrap a single plan in a list")
    plans = list(plans)
    if not plans:
        raise ValueError("plans is empty: give at least one LayerPlan")
    orders: list[tuple[int, ...]] = []
    index: dict[tuple[int, ...], int] = {}
    pids: list[int] = []
    for plan in plans:
        order = _check_plan(model, plan).order
        if order not in index:
            index[order] = len(orders)
            orders.append(order)
        pids.append(index[order])
    return orders, pids


def resolve_stack_tokens(model: HookedTransformer, stack_tokens: int | None) -> int:
    """``stack_tokens`` as the sweep uses it: checked, or the default for the model's device
    (:data:`STACK_TOKENS_CPU` on a CPU, :data:`STACK_TOKENS_ACCELERATOR` elsewhere).

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu", device="cpu"))
        >>> resolve_stack_tokens(m, None), resolve_stack_tokens(m, 256)
        (1024, 256)
    """
    if stack_tokens is None:
        return STACK_TOKENS_CPU if torch.device(model.cfg.device).type == "cpu" else STACK_TOKENS_ACCELERATOR
    if isinstance(stack_tokens, bool) or not isinstance(stack_tokens, int) or stack_tokens < 1:
        raise ValueError(
            f"stack_tokens must be a positive number of token positions (or None for the default), got {stack_tokens!r}"
        )
    return stack_tokens


def iter_plan_batches(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    plans: Sequence[LayerPlan],
    *,
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    per_token: bool = False,
    progress: bool = True,
    fwd_hooks: FwdHooks = (),
    skip: frozenset[int] = frozenset(),
    fast_path: bool = True,
    stack_tokens: int | None = None,
) -> Iterator[BatchResult]:
    """The sweep one batch of sequences at a time (what :func:`evaluate_plans` aggregates).

    Plan ids in the results index the distinct orders of ``plans`` in first-seen order. Batches
    whose index is in ``skip`` are not computed (used to resume from a checkpoint). ``fast_path``
    and ``stack_tokens`` as in :func:`evaluate_plans`.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> from stages_of_inference import LayerPlan
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> out = list(iter_plan_batches(m, torch.tensor([[0, 1, 2, 3]] * 3), [LayerPlan.drop(2, 0)], batch_size=2, progress=False))
        >>> [b.index for b in out], out[0].sums["plan_id"].tolist()
        ([0, 1], [-1, 0])
    """
    model = check_model(model)
    tokens = check_tokens(model, tokens)
    orders, _ = _unique_orders(model, plans)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of sequences, got {batch_size}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive number of token positions, got {chunk_tokens}")
    stack_tokens = resolve_stack_tokens(model, stack_tokens)
    starts = list(range(0, tokens.shape[0], batch_size))
    todo = [(k, s) for k, s in enumerate(starts) if k not in skip]
    trie = _build_trie(orders)
    ticker = _Ticker(len(todo) * len(orders), progress, desc=f"{len(orders)} plans")
    try:
        for k, start in todo:
            batch = tokens[start : start + batch_size]
            with torch.inference_mode(), model.hooks(fwd_hooks=list(fwd_hooks)):
                try:
                    result = _run_batch(model, batch, start, trie, len(orders), chunk_tokens, per_token,
                                        bool(fwd_hooks), ticker, fast_path, stack_tokens)
                finally:
                    set_step(model, None)
            yield BatchResult(k, *result)
    finally:
        ticker.close()


def _trie_walk(trie: _Node, n_layers: int) -> tuple[dict[int, tuple[_Node | None, int, int]], list[_Node], dict[int, int]]:
    """The trie in depth-first (pre-)order: for every node its ``(parent, depth, layer)``, the nodes
    where plans end in that order, and the depth of every node on the trunk (the unmodified
    order ``0, 1, ..., n_layers - 1``)."""
    info: dict[int, tuple[_Node | None, int, int]] = {}
    ends: list[_Node] = []
    stack: list[tuple[_Node, _Node | None, int, int]] = [(trie, None, 0, -1)]
    while stack:
        node, parent, depth, layer = stack.pop()
        info[id(node)] = (parent, depth, layer)
        if node.ends:
            ends.append(node)
        stack.extend((child, node, depth + 1, c) for c, child in reversed(list(node.children.items())))
    trunk = {id(trie): 0}
    node = trie
    for depth in range(n_layers):
        child = node.children.get(depth)
        if child is None:
            break
        trunk[id(child)] = depth + 1
        node = child
    return info, ends, trunk


def _own(x: Tensor) -> Tensor:
    """``x``, or a copy of it if it is a view into a larger tensor (which it would keep alive)."""
    return x.clone() if x.untyped_storage().nbytes() > x.numel() * x.element_size() else x


def _run_batch(
    model: HookedTransformer,
    batch: Tensor,
    first_sequence: int,
    trie: _Node,
    n_plans: int,
    chunk_tokens: int,
    per_token: bool,
    hooked: bool,
    ticker: _Ticker,
    fast_path: bool = True,
    stack_tokens: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    n_layers = model.cfg.n_layers
    n_seq, seq_len = batch.shape
    targets = rearrange(batch[:, 2:], "batch pos -> (batch pos)")
    n_rows = targets.shape[0]
    softcap = model.cfg.output_logits_soft_cap
    unembed = model.unembed
    d_vocab = unembed.W_U.shape[1]
    # The unembedding's own module runs (and its hook points fire) when a hook could see it: the
    # caller's hooks, or a hook attached to the module itself.
    via_module = hooked or _has_hooks(unembed)
    # The unembedding as TransformerLens computes it (F.linear with W_U transposed and contiguous),
    # the transpose made once per batch rather than once per chunk.
    w_t = unembed.W_U.T.contiguous()
    # Logits linear in the final residual (no soft-cap, no hook that could edit them, fp32 or
    # wider): the KL against the reference then needs only a summary of it per row
    # (metrics.LinearReference), not its n_rows x d_vocab log-probabilities.
    linear = not via_module and not (softcap > 0) and unembed.W_U.dtype in (torch.float32, torch.float64)
    blocked = not via_module and unembed.W_U.dtype == torch.float32
    n_vblocks = -(-d_vocab // UNEMBED_BLOCK)
    scratch: Tensor | None = None
    logits_buf: Tensor | None = None
    block_buf: Tensor | None = None

    def logits_of(x: Tensor, rows: slice) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The logits of ``x[rows]`` and, when the blocked unembedding made them, the value and
        (first) index of each row's largest logit."""
        if via_module:  # keep the unembedding's hook points firing, as the model's forward would
            return apply_softcap(unembed(x[rows].unsqueeze(0)).squeeze(0), softcap), None
        if logits_buf is None or block_buf is None:
            return apply_softcap(F.linear(x[rows], w_t, unembed.b_U), softcap), None
        # What F.linear computes, UNEMBED_BLOCK vocabulary columns at a time: each block's product
        # lands in a small buffer that stays in cache and is then copied into the logits buffer
        # (12-16 % faster on CPU than one matmul writing all the logits). The largest logit of
        # each row in each block is taken while the block is in cache: the row's largest logit and
        # its index then cost a pass over one block instead of over the whole vocabulary
        # (Tensor.max(dim) with indices is six times slower than amax on CPU).
        n = rows.stop - rows.start
        xr = x[rows]
        out = logits_buf[:n]
        block_max = x.new_empty(n_vblocks, n)
        for j, v0 in enumerate(range(0, d_vocab, UNEMBED_BLOCK)):
            v1 = min(v0 + UNEMBED_BLOCK, d_vocab)
            part = block_buf[: n * (v1 - v0)].view(n, v1 - v0)
            torch.addmm(unembed.b_U[v0:v1], xr, w_t[v0:v1].t(), out=part)
            torch.amax(part, dim=1, out=block_max[j])
            out[:, v0:v1] = part
        if softcap > 0:
            return apply_softcap(out, softcap), None
        return out, _row_max(out, block_max)

    def final_rows(residual: Tensor) -> Tensor:
        normed = _final_norm(model, residual)
        return rearrange(normed[:, 1 : seq_len - 1], "batch pos d_model -> (batch pos) d_model")

    # ---- the trunk: the unmodified model, residual kept after every block
    emb = _embed(model, batch)
    fast = _fast_blocks(model, emb, hooked, fast_path)
    trunk = [emb.residual]
    for layer in range(n_layers):
        trunk.append(_run_block(model, emb, layer, layer, trunk[-1], fast))
    x_ref = final_rows(trunk[-1])
    # Plans whose blocks run by the fast path are run side by side, up to `lanes` of them stacked
    # along the batch axis into one block call of at most stack_tokens token positions (larger
    # matrix products), and their final residuals are unembedded and reduced together.
    lanes = max(1, stack_tokens // (n_seq * seq_len)) if fast is not None else 1
    # A window holds up to twice as many plans as are stacked: plans next to each other in the
    # trie's order often run different blocks at a step (a deletion's tail runs block d + 1 at
    # step d, a swap's tail block d), so a wider window fills the stacks better.
    window_size = 2 * lanes if lanes > 1 else 1
    stack_metrics = linear and lanes > 1
    # Work buffers reused by every chunk of every plan: the logits of a chunk (overwritten by
    # logit_metrics) and its scratch of ROWS_AT_ONCE rows. Allocating them per chunk costs more
    # than the arithmetic on CPU.
    chunk = min(chunk_tokens, n_rows * (window_size if stack_metrics else 1))
    scratch = torch.empty((min(chunk, ROWS_AT_ONCE), d_vocab), dtype=torch.float32, device=x_ref.device)
    if blocked:
        logits_buf = torch.empty((chunk, d_vocab), dtype=torch.float32, device=x_ref.device)
        block_buf = torch.empty(chunk * min(UNEMBED_BLOCK, d_vocab), dtype=torch.float32, device=x_ref.device)
    ref_lp = None if linear else torch.empty((n_rows, d_vocab), dtype=torch.float32, device=x_ref.device)
    ref_summary: list[LinearReference] = []
    ref_parts: dict[str, list[Tensor]] = {}
    for start in range(0, n_rows, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, n_rows))
        logits, row_max = logits_of(x_ref, rows)
        if linear:
            ref_summary.append(LinearReference.from_logits(logits, unembed.W_U, unembed.b_U))
        else:
            ref_lp[rows] = log_probs(logits)
        metrics = logit_metrics(logits, targets[rows], overwrite=not via_module, scratch=scratch, row_max=row_max)
        n = rows.stop - rows.start
        metrics["kl_nats"] = torch.zeros(n, dtype=torch.float32, device=x_ref.device)  # KL(reference || itself)
        metrics["agree"] = torch.ones(n, dtype=torch.bool, device=x_ref.device)
        for key, value in metrics.items():
            ref_parts.setdefault(key, []).append(value)
    reference = {key: torch.cat(parts) for key, parts in ref_parts.items()}
    ref_top1 = reference["top1"]
    ref_linear = None
    if linear:
        ref_linear = LinearReference(
            torch.cat([r.neg_entropy for r in ref_summary]), torch.cat([r.u for r in ref_summary]),
            torch.cat([r.c for r in ref_summary]), ref_top1,
        )
    del x_ref, ref_summary
    # the per-row references of a window's plans stacked one after another
    tiled_targets, tiled_top1, tiled_ref = targets, ref_top1, ref_linear
    if stack_metrics and ref_linear is not None:
        tiled_targets, tiled_top1 = targets.repeat(window_size), ref_top1.repeat(window_size)
        tiled_ref = LinearReference(ref_linear.neg_entropy.repeat(window_size), ref_linear.u.repeat(window_size, 1),
                                    ref_linear.c.repeat(window_size), tiled_top1)

    def metrics_of(x: Tensor) -> dict[str, Tensor]:
        """Per-token metrics of the final residual rows ``x`` of one plan, or (stacked) of several."""
        parts: dict[str, list[Tensor]] = {}
        for start in range(0, x.shape[0], chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, x.shape[0]))
            ref = tiled_ref[rows] if tiled_ref is not None else ref_lp[rows]
            logits, row_max = logits_of(x, rows)
            metrics = logit_metrics(logits, tiled_targets[rows], ref, tiled_top1[rows], resid=x[rows],
                                    overwrite=not via_module, scratch=scratch, row_max=row_max)
            for key, value in metrics.items():
                parts.setdefault(key, []).append(value)
        return {key: torch.cat(values) for key, values in parts.items()}

    # ---- the plans. Each plan's per-token metrics are reduced to float64 sums at once (and kept
    # only when a per-token table is asked).
    def sums_of(pid: int, m: dict[str, Tensor]) -> dict[str, Any]:
        row: dict[str, Any] = {"plan_id": pid, "n_tokens": n_rows}
        for key in _SUM_KEYS:
            row[f"{key}_sum"] = float(m[key].double().sum())
        return row

    sums_rows: list[dict[str, Any] | None] = [sums_of(-1, reference)] + [None] * n_plans
    results: list[dict[str, Tensor] | None] = [None] * n_plans

    # The trie is walked depth first, `window_size` plan ends at a time (a window). A window
    # computes the nodes on the paths to its plan ends that no earlier window computed, depth by
    # depth, up to `lanes` nodes of one depth that run the same block stacked into one call; the
    # residuals of the path to the window's last plan end are kept for the next window
    # (depth-first order puts every node a later window shares on that path), so every trie node
    # is computed once, and at most `window_size` residuals per depth (plus that path) are alive.
    info, ends, trunk_depth = _trie_walk(trie, n_layers)
    kept: dict[int, Tensor] = {}

    def residual_of(node: _Node) -> Tensor:
        depth = trunk_depth.get(id(node))
        return trunk[depth] if depth is not None else kept[id(node)]

    def path_of(node: _Node) -> set[int]:
        path: set[int] = set()
        while node is not None and id(node) not in trunk_depth:
            path.add(id(node))
            node = info[id(node)][0]
        return path

    for w0 in range(0, len(ends), window_size):
        window = ends[w0 : w0 + window_size]
        todo: dict[int, list[_Node]] = {}  # the nodes to compute, by depth
        seen: set[int] = set()
        for leaf in window:
            node = leaf
            while id(node) not in trunk_depth and id(node) not in kept and id(node) not in seen:
                seen.add(id(node))
                parent, depth, _ = info[id(node)]
                todo.setdefault(depth, []).append(node)
                node = parent
        last = path_of(window[-1])  # kept for the next window
        keep = last | {id(leaf) for leaf in window}
        for depth in sorted(todo):
            by_layer: dict[int, list[_Node]] = {}
            for node in todo[depth]:
                by_layer.setdefault(info[id(node)][2], []).append(node)
            for layer, same in by_layer.items():
                for g in range(0, len(same), lanes):
                    nodes = same[g : g + lanes]
                    inputs = [residual_of(info[id(node)][0]) for node in nodes]
                    if len(nodes) > 1 and fast is not None and fast.allowed[layer]:  # no hook sees the stack
                        outputs = _run_block(model, emb, depth - 1, layer, torch.cat(inputs), fast).split(n_seq)
                    else:
                        outputs = [_run_block(model, emb, depth - 1, layer, x, fast) for x in inputs]
                    for node, out in zip(nodes, outputs):
                        kept[id(node)] = out
            for node in todo.get(depth - 1, ()):  # their children are all computed
                if id(node) not in keep:
                    del kept[id(node)]
        # the window's plans: the unmodified order's metrics are the reference's
        computed = [leaf for leaf in window if trunk_depth.get(id(leaf)) != n_layers]
        window_metrics: dict[int, dict[str, Tensor]] = {}
        if stack_metrics and len(computed) > 1:
            stacked_m = metrics_of(torch.cat([final_rows(residual_of(leaf)) for leaf in computed]))
            for k, leaf in enumerate(computed):
                window_metrics[id(leaf)] = {key: v[k * n_rows : (k + 1) * n_rows] for key, v in stacked_m.items()}
        else:
            for leaf in computed:
                window_metrics[id(leaf)] = metrics_of(final_rows(residual_of(leaf)))
        for leaf in window:
            m = window_metrics.get(id(leaf), reference)
            for pid in leaf.ends:
                sums_rows[pid + 1] = sums_of(pid, m)
                if per_token:
                    results[pid] = m
                ticker.tick()
        kept = {key: _own(value) for key, value in kept.items() if key in last}
    del ref_lp, ref_linear, tiled_ref, scratch, logits_buf, block_buf, fast, kept
    sums = pd.DataFrame(sums_rows)

    table = None
    if per_token:
        seq = np.repeat(np.arange(first_sequence, first_sequence + n_seq), seq_len - 2)
        pos = np.tile(np.arange(1, seq_len - 1), n_seq)
        target_np = targets.cpu().numpy()
        ref_loss = reference["loss"].cpu().numpy()
        ref_top1_np = ref_top1.cpu().numpy()
        frames = []
        for pid, m in enumerate(results):
            assert m is not None
            loss = m["loss"].cpu().numpy()
            frames.append(pd.DataFrame({
                "plan_id": np.full(n_rows, pid, dtype=np.int64),
                "sequence": seq,
                "position": pos,
                "token": target_np,
                "top1": m["top1"].cpu().numpy(),
                "top1_original": ref_top1_np,
                "kl_nats": m["kl_nats"].cpu().numpy(),
                "loss": loss,
                "loss_original": ref_loss,
                "loss_delta": loss - ref_loss,
                "entropy_bits": m["entropy_bits"].cpu().numpy(),
                "confidence": m["confidence"].cpu().numpy(),
                "correct": m["correct"].cpu().numpy(),
                "agree": m["agree"].cpu().numpy(),
            }))
        table = pd.concat(frames, ignore_index=True)
    return sums, table


def aggregate(orders: Sequence[tuple[int, ...]], n_layers: int, batches: Sequence[BatchResult]) -> pd.DataFrame:
    """Means over every scored token of all batches, one row per distinct order (``plan_id``).

    Deterministic: the same batch results always give bit-identical numbers, whether they were just
    computed or read back from a checkpoint. The reference (unmodified model) is in
    ``attrs["reference"]``.
    """
    if not batches:
        raise ValueError("no batch results to aggregate")
    total = pd.concat([b.sums for b in sorted(batches, key=lambda b: b.index)], ignore_index=True)
    total = total.groupby("plan_id", sort=True).sum()
    n = total["n_tokens"].astype(np.float64)
    means = {key: total[f"{key}_sum"] / n for key in _SUM_KEYS}
    ref = {key: float(means[key].loc[-1]) for key in _SUM_KEYS}
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
        })
    df = pd.DataFrame(rows)
    df.attrs["reference"] = {
        "loss": ref["loss"],
        "accuracy": ref["correct"],
        "entropy_bits": ref["entropy_bits"],
        "confidence": ref["confidence"],
        "n_tokens": int(total["n_tokens"].loc[-1]),
    }
    return df


def evaluate_plans(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    plans: Sequence[LayerPlan],
    *,
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    per_token: bool = False,
    progress: bool = True,
    fwd_hooks: FwdHooks = (),
    fast_path: bool = True,
    stack_tokens: int | None = None,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate many layer plans against the unmodified model, sharing every common prefix.

    Metrics (:mod:`stages_of_inference.metrics`, fp32) are taken on the scored positions
    ``1 .. T-2`` of every sequence and pooled over all of them: KL(original || plan) in nats, the
    plan's next-token loss and its difference from the original's, top-1 accuracy and its ratio to
    the original's, top-1 agreement with the original, entropy in bits and top-1 probability.
    Peak memory holds one batch's reference (log-probabilities, or a ``d_model``-sized summary per
    token), at most ``stack_tokens / (batch x pos)`` residuals per trie depth and one chunk of
    logits; it does not grow with the number of plans.

    Args:
        model: a ``HookedTransformer``.
        tokens: ``[batch, pos]`` token ids, BOS first, at least 3 positions.
        plans: layer plans for ``model.cfg.n_layers`` blocks (duplicates are computed once).
        batch_size: sequences per trie pass.
        chunk_tokens: token positions unembedded and reduced at a time.
        per_token: also return the per-token table.
        progress: show a progress bar.
        fwd_hooks: TransformerLens hooks active for every plan *and* the reference run (for
            example an ablation whose effect of reordering is to be measured).
        fast_path: run blocks by :func:`~stages_of_inference.interventions.fastpath.fast_block`
            (the block's function without TransformerLens' per-call weight copies; equal to fp32
            rounding) wherever nothing could observe the difference: no ``fwd_hooks``, no hook on
            the block, a block configuration it reproduces. ``False`` always runs the blocks.
        stack_tokens: with the fast path, plans that run the same block at the same step are
            stacked along the batch axis into one block call of at most this many token
            positions (``batch x pos`` each), and their logits are reduced together: larger matrix
            products, fewer calls. ``None``: :data:`STACK_TOKENS_CPU` on a CPU,
            :data:`STACK_TOKENS_ACCELERATOR` elsewhere. Batches of at least half this size run
            one plan at a time; blocks that take the TransformerLens path are never stacked, so
            hooks always see the batch they were given.

    Returns:
        One row per plan, in the order given: ``plan`` (:meth:`LayerPlan.to_json`), ``label``,
        ``kind``, ``kl_nats``, ``loss``, ``loss_delta``, ``accuracy``, ``relative_accuracy``,
        ``top1_agreement``, ``entropy_bits``, ``confidence``, ``n_tokens``; the unmodified model's
        numbers are in ``attrs["reference"]``. With ``per_token=True``, a pair ``(summary,
        per_token)``; the per-token table has ``plan``, ``sequence``, ``position`` (the predicting
        position), ``token`` (the true next token), ``top1``, ``top1_original``, ``kl_nats``,
        ``loss``, ``loss_original``, ``loss_delta``, ``entropy_bits``, ``confidence``, ``correct``,
        ``agree``.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> from stages_of_inference import LayerPlan
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=3, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> plans = [LayerPlan.identity(3), LayerPlan.drop(3, 1), LayerPlan.swap(3, 0)]
        >>> df = evaluate_plans(m, torch.tensor([[0, 1, 2, 3, 4]]), plans, progress=False)
        >>> df["label"].tolist(), float(df["kl_nats"].iloc[0]), int(df["n_tokens"].iloc[0])
        (['identity', 'drop 1', 'swap 0<->1'], 0.0, 3)
    """
    model = check_model(model)
    orders, pids = _unique_orders(model, plans)
    batches = list(iter_plan_batches(
        model, tokens, plans, batch_size=batch_size, chunk_tokens=chunk_tokens, per_token=per_token,
        progress=progress, fwd_hooks=fwd_hooks, fast_path=fast_path, stack_tokens=stack_tokens,
    ))
    summary = aggregate(orders, model.cfg.n_layers, batches)
    reference = summary.attrs["reference"]
    out = summary.iloc[pids].reset_index(drop=True)
    out.attrs["reference"] = reference
    if not per_token:
        return out
    table = pd.concat([b.per_token for b in batches if b.per_token is not None], ignore_index=True)
    plan_json = np.array([LayerPlan(order=o, n_layers=model.cfg.n_layers).to_json() for o in orders], dtype=object)
    table.insert(0, "plan", plan_json[table.pop("plan_id").to_numpy()])
    return out, table
