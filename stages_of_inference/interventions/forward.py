"""Executing one layer plan: :func:`run_plan` runs a batch through the blocks in the plan's order,
and :func:`reordered` makes the model's own forward follow a plan.

Executing a plan mirrors ``HookedTransformer.forward`` of TransformerLens 3.9: the embedding (and
learned positions, for models that have them) once, then block ``i`` for each ``i`` of the plan,
each with the shortformer positions and attention mask the forward pass would give it, then the
final norm and the unembedding (and the logit soft-cap, for models that have one), all through
the model seam (:mod:`stages_of_inference.backends`). Blocks are the model's own modules, so every
hook keeps its TransformerLens name and fires on the block it names, wherever (and however often)
that block runs. Many plans at once: :mod:`stages_of_inference.interventions.executor`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.utilities import apply_softcap, get_device_for_block_index

from stages_of_inference._tl import HookedTransformer, Model
from stages_of_inference._utils import check_model, check_tokens
from stages_of_inference.backends import ModelSeam, as_seam, backend_of
from stages_of_inference.backends.base import FwdHooks
from stages_of_inference.backends.bridge import reordered_layers
from stages_of_inference.backends.hooked import ORIGINAL_BLOCKS, HookedSeam, only_sublayer
from stages_of_inference.batch import Tokens
from stages_of_inference.interventions.plan import LayerPlan, Step, step_layer, step_part
from stages_of_inference.interventions.step import get_step, set_step

__all__ = ["FwdHooks", "RETURN_TYPES", "reordered", "run_plan"]

RETURN_TYPES = ("logits", "loss", "both", None)
"""The ``return_type`` values :func:`run_plan` accepts (as ``HookedTransformer.forward``)."""


# --------------------------------------------------------------------------- low-level pieces
def _check_plan(seam: ModelSeam, plan: Any) -> LayerPlan:
    if not isinstance(plan, LayerPlan):
        raise TypeError(
            f"expected a LayerPlan, got {type(plan).__name__}; build one with e.g. "
            "LayerPlan.drop(model.cfg.n_layers, i) or LayerPlan(order=(...), n_layers=model.cfg.n_layers)"
        )
    plan = plan.check(seam.n_layers)
    if getattr(getattr(seam.model, "cfg", None), "attn_only", False) and any(step_part(s) == "mlp" for s in plan.order):
        raise ValueError(f"{plan!r} runs an MLP alone, but this model is attention-only (its blocks have no MLP)")
    return plan


# --------------------------------------------------------------------------- one plan
def run_plan(
    model: Model | ModelSeam,
    tokens: Tokens,
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
        model: a ``HookedTransformer`` or ``TransformerBridge`` (or any model seam, :mod:`stages_of_inference.backends`).
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
    seam = as_seam(model)
    plan = _check_plan(seam, plan)
    tokens = check_tokens(seam.model, tokens, min_len=1)
    if return_type not in RETURN_TYPES:
        raise ValueError(f"unknown return_type {return_type!r}; allowed: {RETURN_TYPES}")
    with torch.inference_mode(), seam.hooks(fwd_hooks):
        try:
            emb = seam.embed(tokens)
            residual = emb.residual
            for step, item in enumerate(plan.order):
                residual = seam.run_block(step_layer(item), residual, emb, step, step_part(item))
        finally:
            set_step(seam.model, None)
        residual = seam.final_norm(residual)
        if return_type is None:
            return None
        logits = apply_softcap(seam.unembed_module(residual), seam.softcap)
        if return_type == "logits":
            return logits
        loss = seam.loss(logits, tokens, emb)
        return loss if return_type == "loss" else (logits, loss)


# --------------------------------------------------------------------------- the model's own forward
class _Chain(nn.Module):
    """Several steps run one after another in one slot of ``model.blocks`` (plans longer than the
    model, models spread over several devices, or a step that runs one sublayer of a block).
    """

    def __init__(self, model: HookedTransformer, steps: Sequence[Step]) -> None:
        super().__init__()
        self._cfg = model.cfg
        self._steps = tuple(steps)
        self._layers = tuple(step_layer(s) for s in steps)
        self._run = [HookedSeam(model).blocks()[i] for i in self._layers]  # a plain list: not registered as submodules

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
        for step, layer, block in zip(self._steps, self._layers, self._run):
            device = get_device_for_block_index(layer, self._cfg)
            pos = None if shortformer_pos_embed is None else shortformer_pos_embed.to(device)
            with only_sublayer(block, step_part(step)):
                residual = block(
                    residual.to(device),
                    shortformer_pos_embed=pos,
                    past_kv_cache_entry=past_kv_cache_entry,
                    attention_mask=attention_mask,
                )
        return residual

    def extra_repr(self) -> str:
        return f"steps={self._steps}"


@contextlib.contextmanager
def reordered(model: Model, plan: LayerPlan) -> Iterator[Model]:
    """Make the model's own ``forward``, ``run_with_hooks`` and ``run_with_cache`` follow ``plan``.

    Inside the block, ``model.blocks`` is a list of the model's own block modules in the plan's
    order (the same objects, so hook names are unchanged and hooks fire on the block they name);
    on exit, exceptions included, the original list is put back. ``start_at_layer`` /
    ``stop_at_layer`` count steps of the plan. Plans longer than the model run their surplus steps
    in the last slot. A step that runs one sublayer (``(i, "attn")``) runs block ``i`` with the other
    sublayer's output zeroed at its hook point (hooks there see the zeros). Inside, :func:`stages_of_inference.hooks.current_step` tells hooks the
    execution step. Nested ``reordered`` blocks use the original block indices. Do not save or move
    the model inside the block. Caches from ``run_with_cache`` hold, for a repeated block, its last
    occurrence, and no entries for deleted blocks.

    On a ``TransformerBridge`` the Hugging Face model's layer list is what is reordered (the
    Bridge's blocks are its items), with its layer count set to the plan's length; the Bridge's
    ``blocks`` keep their order, and generation with a key-value cache is not supported inside.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
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
    plan = _check_plan(as_seam(model), plan)
    if backend_of(model) == "bridge":
        with reordered_layers(model, plan.order, step_layer, step_part):
            yield model
        return
    n = model.cfg.n_layers
    original = HookedSeam(model).blocks()
    outermost = model not in ORIGINAL_BLOCKS
    previous_blocks = model.blocks
    previous_step = get_step(model)
    state = {"step": -1}
    multi_device = model.cfg.n_devices > 1
    order = plan.order
    slots: list[nn.Module] = []
    for k in range(min(len(order), n)):
        steps = order[k:] if (k == n - 1 and len(order) > n) else (order[k],)
        if len(steps) == 1 and isinstance(steps[0], int) and not multi_device:
            slots.append(original[steps[0]])
        else:
            slots.append(_Chain(model, steps))

    def on_embed(module: nn.Module, args: Any) -> None:
        state["step"] = -1

    handles = [model.embed.register_forward_pre_hook(on_embed)]
    for layer in sorted({step_layer(s) for s in order}):
        def on_block(module: nn.Module, args: Any, layer: int = layer) -> None:
            state["step"] += 1
            set_step(model, (state["step"], layer))
        handles.append(original[layer].register_forward_pre_hook(on_block))
    try:
        ORIGINAL_BLOCKS[model] = tuple(original)
        model.blocks = nn.ModuleList(slots)
        yield model
    finally:
        model.blocks = previous_blocks
        for handle in handles:
            handle.remove()
        set_step(model, previous_step)
        if outermost:
            ORIGINAL_BLOCKS.pop(model, None)
