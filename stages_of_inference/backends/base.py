"""The model seam: everything the engine, the lens and the weight-based analyses need from a model.

A backend adapts one kind of model object to :class:`ModelSeam`. The engine never asks what kind
of model it holds: it embeds tokens, runs block ``i`` on a residual, applies the final norm and
unembeds, through the seam; the weight-based analyses read processed weights through it.
:func:`stages_of_inference.backends.as_seam` is the one place that picks the backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.utilities import apply_softcap

__all__ = ["ConfigFields", "Embedded", "FwdHooks", "ModelSeam", "output_logits"]

FwdHooks = Sequence[tuple[Any, Callable[..., Any]]]


@dataclass(frozen=True)
class Embedded:
    """The embedded batch and what every block call of it needs besides the residual.

    Attributes:
        residual: the residual stream before block 0, ``[batch, pos, d_model]``.
        extras: what the backend's blocks take besides the residual (positions, masks), opaque
            to the engine.
        plain: ``True`` when the blocks need nothing the fast path cannot supply (no padding
            mask, no separate position stream), so the fast path may run them.
    """

    residual: Float[Tensor, "batch pos d_model"]
    extras: Any = None
    plain: bool = True


@runtime_checkable
class ModelSeam(Protocol):
    """What the library needs from a model (one adapter per kind of model)."""

    @property
    def model(self) -> nn.Module:
        """The adapted model itself (hooks are attached to it)."""

    @property
    def name(self) -> str:
        """The model's name, as results record it."""

    @property
    def n_layers(self) -> int:
        """Number of blocks."""

    @property
    def d_vocab(self) -> int:
        """Vocabulary size."""

    @property
    def device(self) -> str:
        """Where the model's weights are."""

    def blocks(self) -> Sequence[nn.Module]:
        """The blocks in their original order."""

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Embedded:
        """Embed a batch (positions included where the architecture adds them to the residual)."""

    def run_block(self, layer: int, residual: Tensor, embedded: Embedded, step: int, part: str = "block") -> Tensor:
        """Block ``layer`` on ``residual``, as execution step ``step`` of a plan; its hooks fire.
        ``part`` ``"attn"`` or ``"mlp"``: only that sublayer writes to the residual stream (the
        other one's output is zero at its ``hook_mlp_out`` / ``hook_attn_out``).
        """

    def check_sublayers(self, zeroing: bool = False) -> None:
        """Raise ``ValueError`` (one line) where a step that runs one sublayer cannot be made on
        this model; with ``zeroing``, also where zeroing ``hook_attn_out`` / ``hook_mlp_out``
        would not remove just the sublayer's contribution.
        """

    def final_norm(self, residual: Tensor) -> Tensor:
        """The final norm (the identity for models without one)."""

    @property
    def unembed_module(self) -> nn.Module:
        """The unembedding module (its hooks fire when it is called)."""

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The processed unembedding matrix."""

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """The unembedding bias."""

    @property
    def softcap(self) -> float:
        """The logit soft-cap (0: none)."""

    @property
    def logit_scale(self) -> float:
        """What the model multiplies its unembedding's output by before the soft-cap (Granite
        divides by ``logits_scaling``, Cohere multiplies by ``logit_scale``); 1 for most models.
        Every place the library turns a residual into logits applies it.
        """

    def W_out(self, layer: int) -> Float[Tensor, "d_mlp d_model"] | None:
        """Block ``layer``'s MLP output weights (one row per neuron), ``None`` where the block has none."""

    def hooks(self, fwd_hooks: FwdHooks) -> contextlib.AbstractContextManager[Any]:
        """Attach ``fwd_hooks`` (name, function) for the duration of a ``with`` block."""

    def has_hooks(self, module: nn.Module) -> bool:
        """Whether a hook is attached to ``module`` or any module inside it."""

    def reordered(self, steps: Sequence[tuple[int, str]]) -> contextlib.AbstractContextManager[None]:
        """Inside the ``with`` block, the model's own forward runs ``steps`` (``(block, part)``
        pairs naming the original blocks; ``part`` ``"block"``, ``"attn"`` or ``"mlp"``), and
        puts the original order back on exit (:func:`stages_of_inference.reordered`).
        """

    def fast_blocks(self, embedded: Embedded, enabled: bool, dtype: torch.dtype | None = None) -> Any:
        """The fast path for this batch (an object with ``allowed[layer]`` and ``(layer, x)``
        calls), its products in ``dtype`` (``None``: the weights' own) and its residual stream in the residual's own dtype, or
        ``None`` where it cannot run.
        """

    def loss(self, logits: Tensor, tokens: Tensor, embedded: Embedded) -> Tensor:
        """The model's own mean next-token loss."""


class ConfigFields:
    """The seam's ``name``, ``n_layers``, ``d_vocab`` and ``device``, read from ``self.model.cfg``
    (both TransformerLens backends keep them there); an adapter defines ``model``.
    """

    model: Any

    @property
    def name(self) -> str:
        """The model's name, as results record it."""
        return str(getattr(self.model.cfg, "model_name", "model"))

    @property
    def n_layers(self) -> int:
        """Number of blocks."""
        return int(self.model.cfg.n_layers)

    @property
    def d_vocab(self) -> int:
        """Vocabulary size."""
        return int(self.model.cfg.d_vocab)

    @property
    def device(self) -> str:
        """Where the model's weights are."""
        return str(self.model.cfg.device)


def output_logits(seam: ModelSeam, normed: Tensor) -> Tensor:
    """The model's output logits from its final norm's output: the unembedding, then the family's
    output scale and soft-cap, as the model's own forward applies them.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> from stages_of_inference.backends import as_seam
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu"))
        >>> tokens = torch.tensor([[0, 1, 2]])
        >>> _, cache = m.run_with_cache(tokens)
        >>> seam = as_seam(m)
        >>> bool(torch.allclose(output_logits(seam, seam.final_norm(cache["blocks.0.hook_resid_post"])), m(tokens), atol=1e-5))
        True
    """
    logits = seam.unembed_module(normed)
    if seam.logit_scale != 1.0:
        logits = logits * seam.logit_scale
    return apply_softcap(logits, seam.softcap)
