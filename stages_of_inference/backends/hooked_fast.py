"""A hook-free fast path for ``HookedTransformer`` blocks (TransformerLens 3.x), used by the sweep
when nothing can observe it (the arithmetic: :mod:`~stages_of_inference.backends.kernels`).

``TransformerBlock.forward`` of TransformerLens 3.x rebuilds its weight matrices on every call:
the MLP computes ``F.linear(x, W.T.contiguous())`` (a transposed copy of each ``d_model x d_mlp``
matrix), and the attention rearranges ``W_Q``, ``W_K``, ``W_V`` and ``W_O`` into new tensors,
expands grouped keys and values with ``repeat_interleave``, builds a causal mask and applies
rotary embeddings through a cloned tensor. On SmolLM2-135M at 256 tokens per forward these copies
and passes are more than a quarter of a block's time on a CPU (a block: 20-23 ms; by this path:
14-17 ms; its matmuls alone: 12 ms).

:func:`fast_block` computes the same function of the residual stream with the weights in the
layout they are stored in: the MLP as ``x @ W_in`` (no transposed copy), the output projection
as a view of ``W_O``, one matmul for the queries, keys and values (their weights laid side by side
once per block per batch by :class:`FastBlocks`, 2 MB for a SmolLM2 block), queries and keys
rotated together with TransformerLens' own ``rotary_cos`` / ``rotary_sin`` tables, and ``torch.nn.functional.scaled_dot_product_attention`` with a causal
mask, the layer's ``attn_scale`` and grouped key/value heads. The norms are the block's own
modules. It is the same arithmetic in another order, so the output agrees with the block's to
fp32 rounding (checked by ``tests/test_fastpath.py`` on the three tiny block families and on
the real model), not bit for bit.

It runs only when nothing can tell the difference: :func:`fast_path_blocker` lists the conditions
(no hook on any module of the block, no padding mask, no shortformer positions, and a block
configuration it reproduces: pre-norm sequential or parallel blocks, learned or rotary positions,
plain or gated MLPs, multi-head or grouped-query global causal attention, no soft-cap, no QK
norm). Anything else runs the block itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.utilities.activation_functions import softcap_enabled

from stages_of_inference._tl import HAS_HOOKED, HookedTransformer
from stages_of_inference.backends.kernels import (
    BlockWeights,
    Rotary,
    attend,
    compose_block,
    has_hooks,
    mlp_product,
    signed_sin,
)

if HAS_HOOKED:
    from transformer_lens.components import Attention, GroupedQueryAttention, TransformerBlock
    from transformer_lens.components.mlps.gated_mlp import GatedMLP
    from transformer_lens.components.mlps.mlp import MLP
else:  # TransformerLens 4 has no HookedTransformer blocks: the fast path never runs
    Attention = GroupedQueryAttention = TransformerBlock = GatedMLP = MLP = type("Removed", (), {})

__all__ = ["FastBlocks", "block_weights", "fast_block", "fast_path_blocker"]

_ATTENTIONS = (Attention, GroupedQueryAttention)
_MLPS = (MLP, GatedMLP)

# HookedTransformerConfig flags that change a block's arithmetic in ways the fast path does not
# reproduce; each must be falsy (False, None, 0) for the fast path to run.
_UNSUPPORTED_FLAGS = (
    "use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in", "use_qk_norm",
    "clip_qkv", "use_logn_attn", "use_normalization_before_and_after", "load_in_4bit",
    "use_attention_sinks", "use_dynamic_ntk_rope", "ungroup_grouped_query_attention",
)


def _model_blocker(model: HookedTransformer) -> str | None:
    """Why no block of ``model`` can take the fast path (``None`` if its configuration allows it).

    The block-level conditions (its classes, its hooks) are checked by :func:`fast_path_blocker`.
    """
    cfg = model.cfg
    for flag in _UNSUPPORTED_FLAGS:
        if getattr(cfg, flag, None):
            return f"cfg.{flag} is set"
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        return f"positional_embedding_type {cfg.positional_embedding_type!r}"
    if cfg.attention_dir != "causal":
        return f"attention_dir {cfg.attention_dir!r}"
    if softcap_enabled(getattr(cfg, "attn_scores_soft_cap", None)):
        return "attention scores are soft-capped"
    if cfg.is_layer_norm_activation():
        return f"act_fn {cfg.act_fn!r} has a layer norm inside the MLP"
    if cfg.n_devices != 1:
        return "the model is spread over several devices"
    if cfg.original_architecture is not None and "Olmo" in cfg.original_architecture:
        return "OLMo blocks (post-norm or QK-norm)"
    return None


def fast_path_blocker(model: HookedTransformer, block: nn.Module, seq_len: int) -> str | None:
    """Why ``block`` cannot take the fast path for sequences of ``seq_len`` tokens, or ``None``."""
    reason = _model_blocker(model)
    if reason is not None:
        return reason
    if type(block) is not TransformerBlock:
        return f"block class {type(block).__name__}"
    attn, mlp = block.attn, getattr(block, "mlp", None)
    if type(attn) not in _ATTENTIONS:
        return f"attention class {type(attn).__name__}"
    if getattr(attn, "attn_type", "global") != "global" or getattr(attn, "_attention_dir_override", None):
        return "local or non-causal attention"
    if not model.cfg.attn_only and type(mlp) not in _MLPS:
        return f"MLP class {type(mlp).__name__}"
    if model.cfg.positional_embedding_type == "rotary" and attn.rotary_cos.shape[0] < seq_len:
        return "rotary tables shorter than the sequence"
    if has_hooks(block):
        return "a hook is attached to the block"
    if attn.W_Q.dtype not in (torch.float32, torch.float64):
        return f"dtype {attn.W_Q.dtype}"
    return None


def block_weights(block: nn.Module, dtype: torch.dtype | None = None) -> BlockWeights:
    """A ``TransformerBlock``'s :class:`~stages_of_inference.backends.kernels.BlockWeights`, cast to
    ``dtype`` (``None``: as they are; in fp32 every field but ``W_qkv``/``b_qkv`` is a view of the
    block's own parameters).
    """
    attn, mlp = block.attn, getattr(block, "mlp", None)
    d_model, (n_heads, _, d_head) = attn.W_Q.shape[1], attn.W_Q.shape
    if isinstance(attn, GroupedQueryAttention):
        w_k, w_v, b_k, b_v = attn._W_K, attn._W_V, attn._b_K, attn._b_V  # noqa: SLF001 (unexpanded)
    else:
        w_k, w_v, b_k, b_v = attn.W_K, attn.W_V, attn.b_K, attn.b_V
    w_qkv = torch.cat([w.permute(1, 0, 2).reshape(d_model, -1) for w in (attn.W_Q, w_k, w_v)], dim=1)
    b_qkv = torch.cat([attn.b_Q.reshape(-1), b_k.reshape(-1), b_v.reshape(-1)])
    mlp_weights: dict[str, Tensor | None] = {}
    if isinstance(mlp, _MLPS):
        mlp_weights = {"W_in": mlp.W_in, "b_in": mlp.b_in, "W_gate": getattr(mlp, "W_gate", None),
                       "W_out": mlp.W_out, "b_out": mlp.b_out}

    def cast(t: Tensor | None) -> Tensor | None:
        return t if t is None or dtype is None else t.to(dtype)

    return BlockWeights(cast(w_qkv), cast(b_qkv), w_k.shape[0], cast(attn.W_O.reshape(n_heads * d_head, d_model)),
               cast(attn.b_O), **{k: cast(v) for k, v in mlp_weights.items()})


def _rotary_tables(model: HookedTransformer, attn: nn.Module, pos: int,
                   dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor] | None:
    """``cos`` and the signed ``sin`` (:func:`_signed_sin`) of the first ``pos`` positions, shaped
    ``[1, pos, 1, rotary_dim]``, in ``dtype`` (``None``: the tables' own), or ``None`` for a model
    without rotary positions.
    """
    if model.cfg.positional_embedding_type != "rotary":
        return None
    cos = attn.rotary_cos[None, :pos, None, :]
    signed = signed_sin(attn.rotary_sin[:pos], model.cfg.rotary_adjacent_pairs)[None, :, None, :]
    return (cos, signed) if dtype is None else (cos.to(dtype), signed.to(dtype))


def _attention(
    model: HookedTransformer, attn: nn.Module, h: Float[Tensor, "batch pos d_model"],
    weights: BlockWeights, rotary: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    cfg = model.cfg
    n_heads, _, d_head = attn.W_Q.shape
    tables = None
    if cfg.positional_embedding_type == "rotary":
        cos, signed_sin = rotary if rotary is not None else _rotary_tables(model, attn, h.shape[1], weights.W_qkv.dtype)
        tables = Rotary(cos, signed_sin, cfg.rotary_dim, cfg.rotary_adjacent_pairs)
    return attend(h, weights, n_heads, d_head, 1.0 / attn.attn_scale, tables)


def fast_block(
    model: HookedTransformer, block: nn.Module, resid_pre: Float[Tensor, "batch pos d_model"],
    weights: BlockWeights | None = None, check: bool = True, rotary: tuple[Tensor, Tensor] | None = None,
    part: str = "block",
) -> Float[Tensor, "batch pos d_model"]:
    """``block(resid_pre)`` (no padding mask, no shortformer positions) by the fast path; with
    ``part`` ``"attn"`` or ``"mlp"``, only that sublayer's output is added to the residual stream
    (the other sublayer is not computed).

    With ``check=True`` it first asks :func:`fast_path_blocker` and refuses, with its reason, a
    block the fast path does not reproduce (or that carries a hook); :class:`FastBlocks`, which
    has asked once per batch, passes ``check=False``. ``weights`` is the block's
    :class:`BlockWeights`, if the caller keeps them (:class:`FastBlocks` does); otherwise fp32 ones
    are made for this call; likewise ``rotary``, the block's rotary tables for this sequence length
    (:func:`_rotary_tables`). The products run in the dtype of ``weights``; the norms and the
    residual stream stay in the dtype of ``resid_pre``.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> x = torch.randn(2, 6, 8)
        >>> fast_path_blocker(m, m.blocks[0], seq_len=6) is None
        True
        >>> with torch.no_grad():
        ...     bool(torch.allclose(fast_block(m, m.blocks[0], x), m.blocks[0](x), atol=1e-5))
        True
        >>> _ = m.blocks[0].hook_mlp_out.add_hook(lambda act, hook: act)
        >>> fast_path_blocker(m, m.blocks[0], seq_len=6)
        'a hook is attached to the block'
        >>> fast_block(m, m.blocks[0], x)
        Traceback (most recent call last):
        ...
        ValueError: this block cannot take the fast path: a hook is attached to the block; run the block itself
    """
    if check:
        if resid_pre.ndim != 3 or resid_pre.shape[-1] != model.cfg.d_model:
            raise ValueError(
                f"resid_pre must be [batch, pos, d_model={model.cfg.d_model}], got shape {tuple(resid_pre.shape)}"
            )
        reason = fast_path_blocker(model, block, resid_pre.shape[1])
        if reason is not None:
            raise ValueError(f"this block cannot take the fast path: {reason}; run the block itself")
    cfg = model.cfg
    if weights is None:
        weights = block_weights(block)
    mlp = None if cfg.attn_only else (lambda h: mlp_product(weights, block.mlp.act_fn, h))
    return compose_block(resid_pre, part, block.ln1, getattr(block, "ln2", None),
                         lambda h: _attention(model, block.attn, h, weights, rotary), mlp, weights.W_qkv.dtype,
                         parallel=cfg.parallel_attn_mlp, attn_only=cfg.attn_only)


class FastBlocks:
    """The fast path for one sweep batch: which blocks may take it, and their :class:`BlockWeights`
    and rotary tables in the compute dtype, made on first use and kept until the object is dropped
    (in fp32 about 2 MB per block of SmolLM2-135M, the fused query/key/value matrix; in a low dtype
    a copy of every block weight, half its fp32 size; each block runs about as many times per
    batch as the model has blocks). Every call must have the batch's sequence length; any number
    of sequences.

    Args:
        model: the model.
        blocks: its blocks in their original order.
        seq_len: the batch's sequence length.
        dtype: the dtype of the matrix products and the attention (``None``: the weights' own; the
            residual stream keeps its own either way).
    """

    def __init__(self, model: HookedTransformer, blocks: Sequence[nn.Module], seq_len: int,
                 dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.blocks = tuple(blocks)
        self.seq_len = seq_len
        self.dtype = dtype
        self.allowed = tuple(fast_path_blocker(model, b, seq_len) is None for b in self.blocks)
        self._prepared: dict[int, tuple[BlockWeights, tuple[Tensor, Tensor] | None]] = {}

    def __call__(self, layer: int, resid_pre: Tensor, part: str = "block") -> Tensor:
        """Run block ``layer`` (or only its ``part``, :func:`fast_block`) by the fast path (only
        for a ``layer`` in :attr:`allowed`).
        """
        prepared = self._prepared.get(layer)
        if prepared is None:
            block = self.blocks[layer]
            prepared = self._prepared[layer] = (block_weights(block, self.dtype),
                                                _rotary_tables(self.model, block.attn, self.seq_len, self.dtype))
        return fast_block(self.model, self.blocks[layer], resid_pre, prepared[0], check=False, rotary=prepared[1],
                          part=part)
