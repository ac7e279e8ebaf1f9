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
from collections.abc import Iterator
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from stages_of_inference._tl import Model
from stages_of_inference._utils import check_model, check_tokens
from stages_of_inference.backends import ModelSeam, as_seam, output_logits
from stages_of_inference.backends.base import FwdHooks
from stages_of_inference.backends.state import exclusive
from stages_of_inference.backends.step import set_step
from stages_of_inference.batch import Tokens
from stages_of_inference.interventions.plan import LayerPlan, step_layer, step_part

__all__ = ["FwdHooks", "RETURN_TYPES", "reordered", "run_plan"]

RETURN_TYPES = ("logits", "loss", "both", None)
"""The ``return_type`` values :func:`run_plan` accepts (as ``HookedTransformer.forward``)."""


# --------------------------------------------------------------------------- low-level pieces
def check_plan(seam: ModelSeam, plan: Any) -> LayerPlan:
    if not isinstance(plan, LayerPlan):
        raise TypeError(
            f"expected a LayerPlan, got {type(plan).__name__}; build one with e.g. "
            "LayerPlan.drop(model.cfg.n_layers, i) or LayerPlan(order=(...), n_layers=model.cfg.n_layers)"
        )
    plan = plan.check(seam.n_layers)
    if getattr(getattr(seam.model, "cfg", None), "attn_only", False) and any(step_part(s) == "mlp" for s in plan.order):
        raise ValueError(f"{plan!r} runs an MLP alone, but this model is attention-only (its blocks have no MLP)")
    if plan.has_sublayers and hasattr(seam, "check_sublayers"):
        seam.check_sublayers()
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
    plan = check_plan(seam, plan)
    tokens = check_tokens(seam.model, tokens, min_len=1)
    if return_type not in RETURN_TYPES:
        raise ValueError(f"unknown return_type {return_type!r}; allowed: {RETURN_TYPES}")
    with exclusive(seam.model), torch.inference_mode(), seam.hooks(fwd_hooks):
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
        logits = output_logits(seam, residual)
        if return_type == "logits":
            return logits
        loss = seam.loss(logits, tokens, emb)
        return loss if return_type == "loss" else (logits, loss)


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
    seam = as_seam(check_model(model))
    plan = check_plan(seam, plan)
    with exclusive(seam.model), seam.reordered([(step_layer(s), step_part(s)) for s in plan.order]):
        yield seam.model
