"""The :class:`~stages_of_inference.backends.base.ModelSeam` of a TransformerLens 3.x
``HookedTransformer``: its own embedding, blocks (called with the shortformer positions and
attention mask its forward would pass), final norm and unembedding, and its processed weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.utilities import get_device_for_block_index

from stages_of_inference._tl import HookedTransformer
from stages_of_inference.backends.base import ConfigFields, Embedded, FwdHooks
from stages_of_inference.backends.hooked_fast import FastBlocks
from stages_of_inference.backends.kernels import has_hooks
from stages_of_inference.backends.state import original, outermost
from stages_of_inference.backends.step import get_step, set_step

__all__ = ["HookedSeam", "only_sublayer", "reordered_blocks"]


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
        return original(self._model, tuple(self._model.blocks))

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

    def check_sublayers(self, zeroing: bool = False) -> None:
        """Nothing to refuse: a ``HookedTransformer`` block's ``hook_attn_out`` and
        ``hook_mlp_out`` hold exactly what each sublayer adds to the residual stream.
        """

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

    @property
    def logit_scale(self) -> float:
        return 1.0

    def W_out(self, layer: int) -> Float[Tensor, "d_mlp d_model"] | None:
        return getattr(self.blocks()[layer].mlp, "W_out", None)

    def reordered(self, steps: Sequence[tuple[int, str]]) -> contextlib.AbstractContextManager[None]:
        return reordered_blocks(self._model, steps)

    def hooks(self, fwd_hooks: FwdHooks) -> contextlib.AbstractContextManager[Any]:
        return self._model.hooks(fwd_hooks=list(fwd_hooks))

    def has_hooks(self, module: nn.Module) -> bool:
        return has_hooks(module)

    def fast_blocks(self, embedded: Embedded, enabled: bool, dtype: torch.dtype | None = None) -> Any:
        if not enabled or not embedded.plain:
            return None
        return FastBlocks(self._model, self.blocks(), embedded.residual.shape[1], dtype)

    def loss(self, logits: Tensor, tokens: Tensor, embedded: Embedded) -> Tensor:
        return self._model.loss_fn(logits, tokens, embedded.extras[1])


class _Chain(nn.Module):
    """Several steps run one after another in one slot of ``model.blocks`` (plans longer than the
    model, models spread over several devices, or a step that runs one sublayer of a block).
    """

    def __init__(self, model: HookedTransformer, blocks: Sequence[nn.Module], steps: Sequence[tuple[int, str]]) -> None:
        super().__init__()
        self._cfg = model.cfg
        self._steps = tuple(steps)
        self._run = [blocks[layer] for layer, _ in steps]  # a plain list: not registered as submodules

    def forward(
        self,
        resid_pre: Tensor,
        shortformer_pos_embed: Tensor | None = None,
        past_kv_cache_entry: Any = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        if past_kv_cache_entry is not None and len(self._steps) > 1:
            raise NotImplementedError(
                "generation with a key-value cache is not supported under a plan longer than the model"
            )
        residual = resid_pre
        for (layer, part), block in zip(self._steps, self._run):
            device = get_device_for_block_index(layer, self._cfg)
            pos = None if shortformer_pos_embed is None else shortformer_pos_embed.to(device)
            with only_sublayer(block, part):
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
def reordered_blocks(model: HookedTransformer, steps: Sequence[tuple[int, str]]) -> Iterator[None]:
    """The model's own forward runs ``steps`` (``(block, part)`` pairs): ``model.blocks`` is a list
    of the model's own block modules in that order (the same objects, so hook names are unchanged),
    put back on exit, exceptions included. Steps beyond the model's length run in its last slot; a
    sublayer step runs its block with the other sublayer's output zeroed. The step counter
    (:mod:`~stages_of_inference.backends.step`) starts again at every embedding. Nested, the inner
    steps name the original blocks (:mod:`~stages_of_inference.backends.state`).
    """
    n = model.cfg.n_layers
    multi_device = model.cfg.n_devices > 1
    previous_blocks, previous_step = model.blocks, get_step(model)
    with outermost(model, tuple(model.blocks)) as blocks:
        slots: list[nn.Module] = []
        for k in range(min(len(steps), n)):
            these = steps[k:] if (k == n - 1 and len(steps) > n) else (steps[k],)
            if len(these) == 1 and these[0][1] == "block" and not multi_device:
                slots.append(blocks[these[0][0]])
            else:
                slots.append(_Chain(model, blocks, these))
        state = {"step": -1}

        def on_embed(module: nn.Module, args: Any) -> None:
            state["step"] = -1

        handles = [model.embed.register_forward_pre_hook(on_embed)]
        for layer in sorted({layer for layer, _ in steps}):
            def on_block(module: nn.Module, args: Any, layer: int = layer) -> None:
                state["step"] += 1
                set_step(model, (state["step"], layer))
            handles.append(blocks[layer].register_forward_pre_hook(on_block))
        try:
            model.blocks = nn.ModuleList(slots)
            yield
        finally:
            model.blocks = previous_blocks
            for handle in handles:
                handle.remove()
            set_step(model, previous_step)
