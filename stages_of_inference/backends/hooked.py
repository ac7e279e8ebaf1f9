"""The :class:`~stages_of_inference.backends.base.ModelSeam` of a TransformerLens 3.x
``HookedTransformer``: its own embedding, blocks (called with the shortformer positions and
attention mask its forward would pass), final norm and unembedding, and its processed weights.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.utilities import get_device_for_block_index

from stages_of_inference._tl import HookedTransformer
from stages_of_inference.backends.base import ConfigFields, Embedded, FwdHooks
from stages_of_inference.interventions.step import set_step

__all__ = ["HookedSeam", "ORIGINAL_BLOCKS", "only_sublayer"]

# model -> its own blocks in their original order, while `reordered` has replaced model.blocks
ORIGINAL_BLOCKS: weakref.WeakKeyDictionary[HookedTransformer, tuple[nn.Module, ...]] = weakref.WeakKeyDictionary()


_SILENCED = {"attn": "hook_mlp_out", "mlp": "hook_attn_out"}


def _zeros(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    return torch.zeros_like(output)


@contextlib.contextmanager
def only_sublayer(block: nn.Module, part: str) -> Iterator[None]:
    """Inside the ``with``, ``block``'s call writes only its ``part`` (``"attn"`` or ``"mlp"``) to
    the residual stream: the other sublayer's output is replaced by zeros at its hook point
    (``hook_mlp_out`` / ``hook_attn_out``) before any hook attached there sees it (so hooks and
    caches see the zeros the block writes). ``"block"``: the whole block, unchanged.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> x = torch.randn(1, 3, 8)
        >>> with only_sublayer(m.blocks[0], "attn"):
        ...     y = m.blocks[0](x)
        >>> bool(torch.allclose(y, x + m.blocks[0].attn(m.blocks[0].ln1(x), m.blocks[0].ln1(x), m.blocks[0].ln1(x))))
        True
    """
    if part == "block":
        yield
        return
    if part not in _SILENCED:
        raise ValueError(f"unknown sublayer {part!r}; allowed: 'block', {', '.join(map(repr, _SILENCED))}")
    if part == "mlp" and getattr(block, "mlp", None) is None:
        raise ValueError("this block has no MLP (an attention-only model): a plan cannot run its MLP alone")
    handle = getattr(block, _SILENCED[part]).register_forward_hook(_zeros, prepend=True)
    try:
        yield
    finally:
        handle.remove()


class HookedSeam(ConfigFields):
    """A ``HookedTransformer`` behind the model seam.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> seam = HookedSeam(m)
        >>> tokens = torch.tensor([[0, 1, 2]])
        >>> emb = seam.embed(tokens)
        >>> x = seam.run_block(1, seam.run_block(0, emb.residual, emb, 0), emb, 1)
        >>> bool(torch.allclose(seam.final_norm(x) @ seam.W_U + seam.b_U, m(tokens), atol=1e-5))
        True
    """

    def __init__(self, model: HookedTransformer) -> None:
        self._model = model

    @property
    def model(self) -> HookedTransformer:
        return self._model

    def blocks(self) -> Sequence[nn.Module]:
        original = ORIGINAL_BLOCKS.get(self._model)
        return original if original is not None else tuple(self._model.blocks)

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Embedded:
        residual, _, shortformer, mask = self._model.input_to_embed(tokens)
        return Embedded(residual, (shortformer, mask), plain=shortformer is None and mask is None)

    def run_block(self, layer: int, residual: Tensor, embedded: Embedded, step: int, part: str = "block") -> Tensor:
        shortformer, mask = embedded.extras
        device = get_device_for_block_index(layer, self._model.cfg)
        if shortformer is not None:
            shortformer = shortformer.to(device)
        set_step(self._model, (step, layer))
        block = self.blocks()[layer]
        with only_sublayer(block, part):
            return block(residual.to(device), shortformer_pos_embed=shortformer, attention_mask=mask)

    def final_norm(self, residual: Tensor) -> Tensor:
        cfg = self._model.cfg
        residual = residual.to(get_device_for_block_index(cfg.n_layers - 1, cfg))
        return self._model.ln_final(residual) if cfg.normalization_type is not None else residual

    @property
    def unembed_module(self) -> nn.Module:
        return self._model.unembed

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self._model.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self._model.unembed.b_U

    @property
    def softcap(self) -> float:
        return float(self._model.cfg.output_logits_soft_cap)

    def W_out(self, layer: int) -> Float[Tensor, "d_mlp d_model"] | None:
        return getattr(self.blocks()[layer].mlp, "W_out", None)

    def hooks(self, fwd_hooks: FwdHooks) -> contextlib.AbstractContextManager[Any]:
        return self._model.hooks(fwd_hooks=list(fwd_hooks))

    def has_hooks(self, module: nn.Module) -> bool:
        from stages_of_inference.interventions.fastpath import _has_hooks

        return _has_hooks(module)

    def fast_blocks(self, embedded: Embedded, enabled: bool, dtype: torch.dtype | None = None) -> Any:
        from stages_of_inference.interventions.fastpath import FastBlocks

        if not enabled or not embedded.plain:
            return None
        return FastBlocks(self._model, self.blocks(), embedded.residual.shape[1], dtype)

    def loss(self, logits: Tensor, tokens: Tensor, embedded: Embedded) -> Tensor:
        return self._model.loss_fn(logits, tokens, embedded.extras[1])
