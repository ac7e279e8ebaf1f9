"""The arithmetic both backends' fast paths share: one fused query/key/value product, rotary
embeddings, SDPA attention with grouped key/value heads, the MLP from its weights, and a
pre-norm block composed from its pieces. Nothing here knows a backend: the seams build
:class:`BlockWeights` from their own modules (:mod:`~stages_of_inference.backends.hooked_fast`,
:mod:`~stages_of_inference.backends.bridge_fast`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

__all__ = ["BlockWeights", "Rotary", "attend", "compose_block", "first_hook", "has_hooks", "mlp_product", "rotate",
           "signed_sin"]


def first_hook(module: nn.Module, inert: Callable[[Callable[..., Any]], bool] = lambda fn: False) -> str | None:
    """Where the first forward, forward-pre or backward hook on ``module`` or a module inside it
    sits, as ``"<submodule>: <hook function>"``, leaving out hooks ``inert`` says cannot change or
    observe anything the fast path would skip; ``None`` when there is none.

    Example:
        >>> lin = nn.Sequential(nn.Linear(2, 2))
        >>> first_hook(lin) is None
        True
        >>> def spy(m, a, out): pass
        >>> _ = lin[0].register_forward_hook(spy)
        >>> first_hook(lin)
        '0: spy'
    """
    for name, m in module.named_modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks):  # noqa: SLF001
            for fn in hooks.values():
                if not inert(fn):
                    return f"{name or '(the block)'}: {getattr(fn, '__qualname__', type(fn).__name__)}"
    return None


def has_hooks(module: nn.Module) -> bool:
    """Whether any module of ``module`` carries a forward, forward-pre or backward hook (then a
    fast path, which would not call them, must not run it).
    """
    return first_hook(module) is not None


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor, rotary_dim: int, adjacent: bool) -> Tensor:
    """TransformerLens' rotary embedding of the first ``rotary_dim`` features of ``x``
    ``[batch, pos, head, d_head]``; ``cos`` and ``signed_sin`` are ``[1, pos, 1, rotary_dim]``, the
    latter with the sign TransformerLens puts on the rotated-in feature moved onto the sine (the
    products are the same numbers: ``(-a) * s == a * (-s)``).
    """
    x_rot = x[..., :rotary_dim]
    if adjacent:  # GPT-J: pairs (0, 1), (2, 3), ...
        swapped = torch.stack((x_rot[..., 1::2], x_rot[..., 0::2]), dim=-1).flatten(-2)
    else:  # GPT-NeoX: pairs (i, i + rotary_dim / 2)
        half = rotary_dim // 2
        swapped = torch.cat((x_rot[..., half:], x_rot[..., :half]), dim=-1)
    rotated = x_rot * cos + swapped * signed_sin
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def signed_sin(sin: Tensor, adjacent: bool) -> Tensor:
    """``sin`` with the sign of the rotated-in feature: TransformerLens' ``rotate_every_two`` maps
    ``(a, b)`` pairs to ``(-b, a)``, so the first feature of each pair gets ``-sin``.
    """
    signed = sin.clone()
    if adjacent:
        signed[..., 0::2] = -sin[..., 0::2]
    else:
        half = sin.shape[-1] // 2
        signed[..., :half] = -sin[..., :half]
    return signed


@dataclass(frozen=True)
class BlockWeights:
    """One block's weights in the layout and dtype the fast path multiplies by.

    ``W_qkv`` is ``W_Q``, ``W_K``, ``W_V`` side by side as one ``[d_model, (heads + 2 kv_heads)
    d_head]`` matrix (``b_qkv`` their biases), ``n_kv`` the number of key/value heads, ``W_O`` the
    output projection as ``[heads d_head, d_model]``, and the MLP's matrices as stored (``W_gate``
    is ``None`` for an ungated MLP; all MLP fields are ``None`` for an attention-only model). In
    fp32 the fields other than ``W_qkv``/``b_qkv`` are views of the block's own parameters; in a low
    dtype they are copies.
    """

    W_qkv: Tensor
    b_qkv: Tensor
    n_kv: int
    W_O: Tensor
    b_O: Tensor
    W_in: Tensor | None = None
    b_in: Tensor | None = None
    W_gate: Tensor | None = None
    W_out: Tensor | None = None
    b_out: Tensor | None = None


@dataclass(frozen=True)
class Rotary:
    """Rotary tables for :func:`attend`: ``cos`` and the signed sine (:func:`signed_sin`), shaped
    to broadcast over ``[batch, pos, head, rotary_dim]``, and how features are paired.
    """

    cos: Tensor
    signed_sin: Tensor
    dim: int
    adjacent: bool


def attend(h: Float[Tensor, "batch pos d_model"], weights: BlockWeights, n_heads: int, d_head: int, scale: float,
           rotary: Rotary | None, qk_norms: tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] | None = None,
           softcap: float = 0.0) -> Float[Tensor, "batch pos d_model"]:
    """Causal attention from a block's :class:`BlockWeights`: one fused query/key/value product,
    each query and key head normed where ``qk_norms`` are given (Qwen3, Gemma 3), queries and keys
    rotated together (``rotary``, or none), grouped key/value heads, one SDPA call with ``scale``
    (or, with a ``softcap`` on the attention scores, Gemma 2's, the same steps written out: SDPA
    has no soft-cap), the output product. Both backends' fast paths run it.
    """
    batch, pos, d_model = h.shape
    n_kv = weights.n_kv
    qkv = torch.addmm(weights.b_qkv, h.reshape(batch * pos, d_model), weights.W_qkv)
    qk, v = qkv.split(((n_heads + n_kv) * d_head, n_kv * d_head), dim=1)
    qk = qk.view(batch, pos, n_heads + n_kv, d_head)
    v = v.view(batch, pos, n_kv, d_head)
    if qk_norms is not None:
        q_norm, k_norm = qk_norms
        qk = torch.cat((q_norm(qk[:, :, :n_heads]), k_norm(qk[:, :, n_heads:])), dim=2).to(v.dtype)
    if rotary is not None:
        qk = rotate(qk, rotary.cos, rotary.signed_sin, rotary.dim, rotary.adjacent)
    q, k = qk[:, :, :n_heads], qk[:, :, n_heads:]
    if softcap > 0:
        z = _softcapped_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, softcap)
    else:
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, scale=scale, enable_gqa=n_kv != n_heads,
        )  # [batch, head, pos, d_head]
    z = z.transpose(1, 2).reshape(batch * pos, n_heads * d_head)
    out = torch.addmm(weights.b_O, z, weights.W_O)
    return out.view(batch, pos, d_model)


def _softcapped_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float) -> Tensor:
    """Causal attention whose scores are soft-capped before the mask (``cap * tanh(s / cap)``),
    the softmax in fp32, as Gemma 2's eager attention; ``[batch, head, pos, d_head]`` in and out.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * (scale / softcap)) * softcap
    pos = q.shape[2]
    scores = scores.masked_fill(torch.ones(pos, pos, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


def compose_block(resid_pre: Tensor, part: str, ln1: Any, ln2: Any, attention: Any, mlp: Any, dtype: torch.dtype,
                  parallel: bool = False, attn_only: bool = False, post_attn: Any = None, post_mlp: Any = None,
                  ) -> Tensor:
    """A pre-norm block from its pieces: ``attention`` and ``mlp`` take normed inputs in ``dtype``,
    their outputs normed again by ``post_attn`` / ``post_mlp`` where given (Gemma 2 and 3) before
    they are added; ``part`` ``"attn"`` or ``"mlp"`` adds only that sublayer (the MLP then reads
    the block's input, as it does in a parallel block); the residual stream stays in
    ``resid_pre``'s dtype.
    """
    def attn_part(x: Tensor) -> Tensor:
        out = attention(ln1(x).to(dtype))
        return out if post_attn is None else post_attn(out)

    def mlp_part(x: Tensor) -> Tensor:
        out = mlp(ln2(x).to(dtype))
        return out if post_mlp is None else post_mlp(out)

    if part == "mlp":
        return resid_pre + mlp_part(resid_pre)
    attn_out = attn_part(resid_pre)
    if attn_only or part == "attn":
        return resid_pre + attn_out
    if parallel:
        return resid_pre + attn_out + mlp_part(resid_pre)
    resid_mid = resid_pre + attn_out
    return resid_mid + mlp_part(resid_mid)


def mlp_product(weights: BlockWeights, act_fn: Any, h: Float[Tensor, "batch pos d_model"]) -> Tensor:
    """The MLP of a block from its :class:`BlockWeights` (gated or not): ``act(h W_in + b_in) W_out + b_out``."""
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    if weights.W_gate is not None:
        post = act_fn(x @ weights.W_gate)
        post.mul_(x @ weights.W_in).add_(weights.b_in)
    else:
        post = act_fn(torch.addmm(weights.b_in, x, weights.W_in))
    return torch.addmm(weights.b_out, post, weights.W_out).view(shape)
