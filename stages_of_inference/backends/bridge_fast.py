"""The fast path on the TransformerBridge: Llama-style layers computed from their weights, so that
the sweep can stack plans that run the same block at the same step into one block call.

The Bridge's blocks are Hugging Face layers behind hook points; a block call runs the layer's own
code one plan at a time. Where the layer is one whose computation this module reproduces (a
``LlamaDecoderLayer``: pre-norm RMSNorm, rotary attention with grouped keys and values, causal
mask, gated MLP; SmolLM2 and the many checkpoints that reuse Llama's layer; Mistral's and Qwen2's
layers, the same computation with query/key/value biases in Qwen2's and a sliding window, which
the fast path takes where the window is at least the batch's length; Qwen3's, which norms each
query and key head before the rotation; Gemma's, Llama's with a GELU and norm weights stored as
offsets from 1; Gemma 2's and 3's, which also norm each sublayer's output again
before adding it, Gemma 2's with soft-capped attention scores, Gemma 3's with Qwen3's head norms),
where nothing could
observe the difference (no hook on the block), and where the layer's recorded call is the plain
causal one (no sliding window, no padding), :class:`BridgeFastBlocks` computes the block from its
weights instead, with the products of :mod:`stages_of_inference.backends.kernels` (one fused
query/key/value product, one SDPA call). Its inputs may be any number of sequences (plans
stacked), because the rotary tables it reads from the recorded call broadcast over the batch and
the mask is SDPA's causal one.

Everywhere else the block runs as itself; :func:`bridge_fast_path_blocker` says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stages_of_inference.backends.kernels import (
    BlockWeights,
    Rotary,
    attend,
    compose_block,
    first_hook,
    mlp_product,
    signed_sin,
)

__all__ = ["BRIDGE_FAST_LAYERS", "INERT_HOOKS", "BridgeFastBlocks", "bridge_fast_path_blocker", "inert_hook",
           "norm_parameters"]

BRIDGE_FAST_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                      "GemmaDecoderLayer", "Gemma2DecoderLayer", "Gemma3DecoderLayer")
"""Hugging Face layer classes the Bridge fast path reproduces (tested: tests/test_bridge.py)."""


def norm_parameters(norm: nn.Module, cfg: Any) -> tuple[str, float, Tensor | None]:
    """What a Bridge norm computes: ``"rms"`` or ``"ln"``, its epsilon (``cfg.eps``: the Bridge
    computes the norm itself) and the weight it multiplies by (``None`` for none), with Gemma's
    weights, stored as an offset from 1 (``cfg.rmsnorm_uses_offset``), made whole. In
    compatibility mode the weight is folded into the next layer and what is left is 1.
    """
    weight = getattr(norm, "weight", None)
    if weight is not None:
        weight = weight.detach().float() + (1.0 if getattr(cfg, "rmsnorm_uses_offset", False) else 0.0)
    return ("rms" if norm.uses_rms_norm else "ln"), float(getattr(cfg, "eps", 1e-5)), weight


@dataclass(frozen=True)
class _Norm:
    """A block's RMSNorm as the Bridge computes it: ``x / sqrt(mean(x^2) + eps) * weight``."""

    eps: float
    weight: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        return x / (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt() * self.weight


def _norm_of(module: nn.Module, cfg: Any) -> _Norm:
    _, eps, weight = norm_parameters(module, cfg)
    return _Norm(eps, weight)


def _is_causal(mask: Tensor | None, seq_len: int) -> bool:
    """Whether a recorded attention mask is the plain causal one (``None``: SDPA's own causal mask)."""
    if mask is None:
        return True
    square = mask.reshape(-1, mask.shape[-2], mask.shape[-1])
    if square.shape[-1] != seq_len or square.shape[-2] != seq_len:
        return False
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((square == causal).all())
    blocked = square <= torch.finfo(square.dtype).min / 2
    return bool((square[:, causal] == 0).all() and blocked[:, ~causal].all())


INERT_HOOKS = ("install_output_capuring_hook.<locals>.output_capturing_hook",
               "_maybe_wire_capture_hooks.<locals>._capture_pre_ln1",
               "_maybe_wire_capture_hooks.<locals>._capture_mlp_in")
"""Hooks that Hugging Face and TransformerLens 4 leave on a Bridge's layers after its own forward
(``bridge(tokens)``, ``run_with_cache``) and that do nothing the fast path would skip: transformers'
output capture writes only while one of its own forwards collects outputs; the Bridge's capture
hooks keep the block's input for its own forward and apply ``hook_mlp_in`` only when that hook
point is in use (and a hook on a hook point blocks the fast path by itself)."""


def inert_hook(fn: Any) -> bool:
    """Whether ``fn`` is one of :data:`INERT_HOOKS` (by its qualified name: an unknown hook blocks).

    Example:
        >>> inert_hook(lambda m, a, o: None)
        False
    """
    return getattr(fn, "__qualname__", "").endswith(INERT_HOOKS)


def bridge_fast_path_blocker(bridge: Any, layer: int, call: Any, seq_len: int) -> str | None:
    """Why block ``layer`` of ``bridge`` cannot take the fast path for a batch whose recorded call
    to that layer is ``call`` (:class:`~stages_of_inference.backends.bridge.LayerCall`), or ``None``.
    """
    block = bridge.blocks[layer]
    hf_layer = getattr(block, "original_component", None)
    name = type(hf_layer).__name__
    if name not in BRIDGE_FAST_LAYERS:
        return f"Hugging Face layer {name}: the Bridge fast path reproduces {', '.join(BRIDGE_FAST_LAYERS)}"
    hook = first_hook(block, inert_hook)
    if hook is not None:
        return f"a hook is attached to the block ({hook})"
    attn = hf_layer.self_attn
    window = getattr(attn, "sliding_window", None)
    if window and window < seq_len:
        return "sliding-window attention shorter than the batch"
    if call.args or not _is_causal(call.kwargs.get("attention_mask"), seq_len):
        return "the layer's recorded call is not the plain causal one"
    if not isinstance(call.kwargs.get("position_embeddings"), tuple):
        return "no rotary tables in the layer's recorded call"
    if block.attn.W_Q.dtype not in (torch.float32, torch.float64):
        return f"dtype {block.attn.W_Q.dtype}"
    return None


def _weights(block: nn.Module, dtype: torch.dtype | None) -> BlockWeights:
    """A Llama-style Bridge block's weights in the fast path's layout (absent biases as zeros)."""
    attn, mlp = block.attn, block.mlp
    n_heads, d_model, d_head = attn.W_Q.shape

    def flat(w: Tensor) -> Tensor:  # [heads, d_model, d_head] -> [d_model, heads * d_head]
        return w.detach().permute(1, 0, 2).reshape(d_model, -1)

    def bias(b: Tensor | None, size: int) -> Tensor:
        return attn.W_Q.new_zeros(size) if b is None else b.detach().reshape(-1)

    n_kv = attn.W_K.shape[0]
    w_qkv = torch.cat([flat(attn.W_Q), flat(attn.W_K), flat(attn.W_V)], dim=1)
    b_qkv = torch.cat([bias(getattr(attn, "b_Q", None), n_heads * d_head), bias(getattr(attn, "b_K", None), n_kv * d_head),
                       bias(getattr(attn, "b_V", None), n_kv * d_head)])
    d_mlp = mlp.W_in.shape[1]
    fields = {"W_qkv": w_qkv, "b_qkv": b_qkv, "n_kv": n_kv, "W_O": attn.W_O.detach().reshape(n_heads * d_head, d_model),
              "b_O": bias(getattr(attn, "b_O", None), d_model), "W_in": mlp.W_in.detach(),
              "b_in": bias(getattr(mlp, "b_in", None), d_mlp), "W_gate": mlp.W_gate.detach(), "W_out": mlp.W_out.detach(),
              "b_out": bias(getattr(mlp, "b_out", None), d_model)}
    if dtype is not None:
        fields = {k: v.to(dtype) if isinstance(v, Tensor) else v for k, v in fields.items()}
    return BlockWeights(**fields)


@dataclass
class _Prepared:
    weights: BlockWeights
    ln1: _Norm
    ln2: _Norm
    act: nn.Module
    scale: float
    rotary: Rotary
    n_heads: int
    d_head: int
    qk_norms: tuple[_Norm, _Norm] | None = None
    post_attn: _Norm | None = None
    post_mlp: _Norm | None = None
    softcap: float = 0.0


def _head_norms(attn: nn.Module, cfg: Any) -> tuple[_Norm, _Norm] | None:
    """The RMSNorms a Qwen3 or Gemma 3 attention applies to each query and key head (``None``
    elsewhere), Gemma's weights, stored as an offset from 1, made whole.
    """
    if getattr(attn, "q_norm", None) is None:
        return None
    offset = 1.0 if getattr(cfg, "rmsnorm_uses_offset", False) else 0.0
    return tuple(_Norm(float(getattr(norm, "variance_epsilon", None) or norm.eps), norm.weight.detach().float() + offset)
                 for norm in (attn.q_norm, attn.k_norm))  # type: ignore[return-value]


def _post_norm(block: nn.Module, name: str, cfg: Any) -> _Norm | None:
    """The norm a Gemma 2/3 block applies to a sublayer's output before adding it (``None`` elsewhere)."""
    norm = getattr(block, name, None)
    return _norm_of(norm, cfg) if norm is not None else None


class BridgeFastBlocks:
    """The Bridge's fast path for one batch: ``allowed[layer]``, and ``(layer, x, part)`` calls on
    any number of sequences of the batch's length (the executor's interface,
    :class:`~stages_of_inference.backends.hooked_fast.FastBlocks`).

    Args:
        bridge: the Bridge.
        calls: the batch's recorded layer calls (:meth:`BridgeSeam.embed`), by layer.
        seq_len: the batch's sequence length.
        dtype: the products' dtype (``None``: the weights' own); norms and the residual stream keep
            the residual's dtype.
    """

    def __init__(self, bridge: Any, calls: dict[int, Any], seq_len: int, dtype: torch.dtype | None = None) -> None:
        self._bridge, self._calls, self._dtype = bridge, calls, dtype
        self.reasons = {layer: bridge_fast_path_blocker(bridge, layer, calls[layer], seq_len)
                        for layer in range(len(bridge.blocks))}
        self.allowed = tuple(self.reasons[layer] is None for layer in range(len(bridge.blocks)))
        self._prepared: dict[int, _Prepared] = {}

    def _prepare(self, layer: int) -> _Prepared:
        block, cfg = self._bridge.blocks[layer], self._bridge.cfg
        hf_layer = block.original_component
        cos, sin = self._calls[layer].kwargs["position_embeddings"]
        dtype = self._dtype or block.attn.W_Q.dtype
        return _Prepared(_weights(block, self._dtype), _norm_of(block.ln1, cfg), _norm_of(block.ln2, cfg),
                         hf_layer.mlp.act_fn, float(hf_layer.self_attn.scaling),
                         Rotary(cos[:, :, None, :].to(dtype), signed_sin(sin, adjacent=False)[:, :, None, :].to(dtype),
                                cos.shape[-1], adjacent=False),
                         block.attn.W_Q.shape[0], block.attn.W_Q.shape[2], _head_norms(hf_layer.self_attn, cfg),
                         _post_norm(block, "ln1_post", cfg), _post_norm(block, "ln2_post", cfg),
                         float(getattr(hf_layer.self_attn, "attn_logit_softcapping", None) or 0.0))

    def __call__(self, layer: int, resid_pre: Tensor, part: str = "block") -> Tensor:
        """Block ``layer`` (or only its ``part``: ``"attn"`` or ``"mlp"``) on ``resid_pre``."""
        p = self._prepared.get(layer)
        if p is None:
            p = self._prepared[layer] = self._prepare(layer)
        w = p.weights
        return compose_block(resid_pre, part, p.ln1, p.ln2,
                             lambda h: attend(h, w, p.n_heads, p.d_head, p.scale, p.rotary, p.qk_norms, p.softcap),
                             lambda h: mlp_product(w, p.act, h), w.W_qkv.dtype, post_attn=p.post_attn,
                             post_mlp=p.post_mlp)
