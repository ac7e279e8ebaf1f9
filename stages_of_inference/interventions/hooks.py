"""Composable TransformerLens hooks and streaming collectors.

A :class:`Collector` is a streaming statistic: it contributes forward hooks that fold each batch's
activations into running state as they are produced, so no activation cache is ever kept.
Collectors combine with each other and with any user hooks in one forward pass
(:func:`collect`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from stages_of_inference._tl import Model
from stages_of_inference._utils import check_count, check_model, check_tokens
from stages_of_inference._utils import progress as _progress
from stages_of_inference.backends import as_seam
from stages_of_inference.backends.state import exclusive
from stages_of_inference.backends.step import get_step
from stages_of_inference.batch import Tokens
from stages_of_inference.metrics import NonFiniteError
from stages_of_inference.precision import autocast, check_model_precision

__all__ = ["FiniteCheck", "AttentionReadout", "Collector", "FwdHook", "HookFn", "ResidualReadout", "collect", "current_step",
    "drop_layer", "drop_layers", "observe_in_fp32", "resid_hook_name"]

HookFn = Callable[[Tensor, HookPoint], Any]
FwdHook = tuple[str | Callable[[str], bool], HookFn]


class Collector:
    """Base class of streaming statistics.

    Subclasses implement :meth:`fwd_hooks`; they may override :meth:`start_batch`, which
    :func:`collect` calls with each batch's tokens before its forward pass.
    """

    def start_batch(self, tokens: Tokens) -> None:
        """Called with each batch's tokens before its forward pass."""

    def fwd_hooks(self, model: Model) -> list[FwdHook]:
        """The (hook name, function) pairs that feed this collector."""
        raise NotImplementedError


def resid_hook_name(model: Model, point: int) -> str:
    """Hook name of residual readout ``point``: the input of block ``point``, or, for
    ``point == n_layers``, the output of the last block (before the final norm).

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu"))
        >>> resid_hook_name(m, 0), resid_hook_name(m, 2)
        ('blocks.0.hook_resid_pre', 'blocks.1.hook_resid_post')
    """
    n = model.cfg.n_layers
    if not 0 <= point <= n:
        raise ValueError(f"residual readout point {point} out of range: 0 (embedding) .. {n} (output)")
    return f"blocks.{point}.hook_resid_pre" if point < n else f"blocks.{n - 1}.hook_resid_post"


class ResidualReadout(Collector):
    """Hands each residual-stream readout to ``reduce(point, resid)`` as soon as it exists.

    Readout ``point`` is the residual stream before block ``point`` (0 = embeddings), and
    ``n_layers`` is the output of the last block. ``reduce`` folds it into whatever state it
    keeps; the tensor itself is not stored.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu"))
        >>> norms = {}
        >>> r = ResidualReadout(lambda k, x: norms.__setitem__(k, x.norm().item()))
        >>> collect(m, torch.tensor([[0, 1, 2]]), [r], progress=False)
        >>> sorted(norms)
        [0, 1, 2]
    """

    def __init__(
        self,
        reduce: Callable[[int, Float[Tensor, "batch pos d_model"]], None],
        points: Sequence[int] | None = None,
    ) -> None:
        self.reduce = reduce
        self.points = None if points is None else tuple(points)

    def fwd_hooks(self, model: Model) -> list[FwdHook]:
        """The ``(name, function)`` hooks that collect the readouts of ``model``."""
        points = range(model.cfg.n_layers + 1) if self.points is None else self.points
        hooks: list[FwdHook] = []
        for point in points:
            def hook(resid: Tensor, hook: HookPoint, point: int = point) -> None:
                self.reduce(point, resid)
            hooks.append((resid_hook_name(model, point), hook))
        return hooks


class AttentionReadout(Collector):
    """Hands each layer's attention pattern ``[batch, head, query, key]`` to ``reduce(layer, pattern)``.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu"))
        >>> seen = []
        >>> collect(m, torch.tensor([[0, 1, 2]]), [AttentionReadout(lambda l, p: seen.append((l, tuple(p.shape))))], progress=False)
        >>> seen
        [(0, (1, 2, 3, 3)), (1, (1, 2, 3, 3))]
    """

    def __init__(
        self,
        reduce: Callable[[int, Float[Tensor, "batch head query key"]], None],
        layers: Sequence[int] | None = None,
    ) -> None:
        self.reduce = reduce
        self.layers = None if layers is None else tuple(layers)

    def fwd_hooks(self, model: Model) -> list[FwdHook]:
        """The ``(name, function)`` hooks that collect the attention patterns of ``model``."""
        layers = range(model.cfg.n_layers) if self.layers is None else self.layers
        hooks: list[FwdHook] = []
        for layer in layers:
            if not 0 <= layer < model.cfg.n_layers:
                raise ValueError(f"layer {layer} out of range: 0 .. {model.cfg.n_layers - 1}")
            def hook(pattern: Tensor, hook: HookPoint, layer: int = layer) -> None:
                self.reduce(layer, pattern)
            hooks.append((f"blocks.{layer}.attn.hook_pattern", hook))
        return hooks


class FiniteCheck(Collector):
    """Whether the residual stream entering each block (and leaving the last) stayed finite.

    Statistics read through TransformerLens' hooks can hide a broken model: its attention turns NaN
    weights into zeros. Collected beside them, this says where non-finite values first entered.
    The flags stay on the model's device until read (no synchronisation per block).

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu"))
        >>> check = FiniteCheck()
        >>> collect(m, torch.tensor([[0, 1, 2]]), [check], progress=False)
        >>> check.first_nonfinite() is None
        True
    """

    def __init__(self) -> None:
        self.flags: Tensor | None = None

    def fwd_hooks(self, model: Model) -> list[FwdHook]:
        """Hooks on every residual readout (block inputs, then the last block's output)."""
        n = model.cfg.n_layers
        if self.flags is None:
            self.flags = torch.ones(n + 1, dtype=torch.bool, device=model.cfg.device)

        def hook(point: int) -> HookFn:
            def record(resid: Tensor, hook: HookPoint) -> None:
                self.flags[point] &= torch.isfinite(resid).all()
            return record
        return [(resid_hook_name(model, p), hook(p)) for p in range(n + 1)]

    def first_nonfinite(self) -> int | None:
        """The first readout (0 = the input of block 0 ... ``n_layers`` = the output) that was not
        finite in any batch, or ``None``.
        """
        if self.flags is None or bool(self.flags.all()):
            return None
        return int((~self.flags).nonzero()[0, 0])


def collect(
    model: Model,
    tokens: Tokens,
    collectors: Sequence[Collector],
    *,
    batch_size: int = 8,
    fwd_hooks: Sequence[FwdHook] = (),
    progress: bool = True,
    precision: str = "fp32",
) -> None:
    """Run ``tokens`` through ``model`` in batches with every collector's hooks (and ``fwd_hooks``)
    attached; the collectors hold the results. Logits are not computed.

    With a low ``precision`` (:mod:`stages_of_inference.precision`) the forward runs under its
    autocast, and the collectors still see fp32 activations and compute outside it (their
    statistics stay fp32); ``fwd_hooks`` run as the forward does.

    The residual stream is checked too (:class:`FiniteCheck`): if the model produces a NaN or an
    infinity, a :class:`~stages_of_inference.metrics.NonFiniteError` names the block it first
    enters, instead of statistics that would hide it (TransformerLens zeroes NaN attention weights).
    """
    model = check_model(model)
    tokens = check_tokens(model, tokens, min_len=1)
    batch_size = check_count(batch_size, "batch_size", "a positive number of sequences")
    precision = check_model_precision(as_seam(model).W_U.dtype, precision, model.cfg.device)
    finite = FiniteCheck()
    observe = observe_in_fp32 if precision != "fp32" else (lambda fn: fn)
    hooks = [(name, observe(fn)) for c in (*collectors, finite) for name, fn in c.fwd_hooks(model)] + list(fwd_hooks)
    starts = range(0, tokens.shape[0], batch_size)
    with torch.inference_mode(), autocast(precision, model.cfg.device):
        for start in _progress(starts, progress, desc="collect"):
            batch = tokens[start : start + batch_size]
            for c in collectors:
                c.start_batch(batch)
            with exclusive(model):
                model.run_with_hooks(batch, return_type=None, fwd_hooks=hooks)
    bad = finite.first_nonfinite()
    if bad is not None:
        where = f"entering block {bad}" if bad < model.cfg.n_layers else "leaving the last block"
        raise NonFiniteError(f"the residual stream {where} is NaN or infinite: the model produces non-finite values "
                             "there, and no statistic read from it is returned; check its weights")



def observe_in_fp32(fn: HookFn) -> HookFn:
    """``fn``, a hook that only observes, as an observer of a low-precision forward
    (:mod:`stages_of_inference.precision`): it gets the activation in fp32 and runs outside
    autocast, so what it computes from it stays fp32.

    Example:
        >>> import torch
        >>> seen = []
        >>> hook = observe_in_fp32(lambda act, hook: seen.append((act.dtype, (act @ act).dtype)))
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     hook(torch.ones(2, 2, dtype=torch.bfloat16), HookPoint())
        >>> seen
        [(torch.float32, torch.float32)]
    """
    def hook(act: Tensor, hook: HookPoint) -> None:
        with torch.autocast(act.device.type, enabled=False):
            fn(act.float() if act.is_floating_point() else act, hook)
    return hook


def _zero_hook(value: Tensor, hook: HookPoint) -> Tensor:
    return torch.zeros_like(value)


def drop_layer(model: Model, layer: int) -> list[FwdHook]:
    """Forward hooks that delete block ``layer`` the authors' way: zero its attention output and its
    MLP output (``hook_attn_out`` and ``hook_mlp_out``, biases included), so the residual stream
    passes through the block unchanged.

    Pass the list to ``model.run_with_hooks(tokens, fwd_hooks=...)`` or ``model.hooks(...)``; it
    composes with any other hooks. :func:`stages_of_inference.run_plan` with
    ``LayerPlan.drop(n_layers, layer)`` gives the same logits without running the block.

    Args:
        model: the model whose block is deleted.
        layer: block index, ``0 .. n_layers - 1``.

    Returns:
        Two ``(hook name, hook function)`` pairs.

    Raises:
        ValueError: on a family whose ``hook_attn_out`` / ``hook_mlp_out`` hold the residual plus
            the sublayer's output (Bloom, MPT on the Bridge), where zeroing them would wipe the
            residual stream: use ``LayerPlan.drop`` with ``run_plan`` there.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu"))
        >>> [name for name, _ in drop_layer(m, 1)]
        ['blocks.1.hook_attn_out', 'blocks.1.hook_mlp_out']
        >>> with m.hooks(fwd_hooks=drop_layer(m, 1)):
        ...     _, cache = m.run_with_cache(torch.tensor([[0, 1, 2]]))
        >>> torch.equal(cache["blocks.1.hook_resid_pre"], cache["blocks.1.hook_resid_post"])
        True
    """
    model = check_model(model)
    n = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int block index, got {type(layer).__name__}")
    if not 0 <= layer < n:
        raise ValueError(f"cannot drop block {layer}: the model has blocks 0 .. {n - 1}")
    as_seam(model).check_sublayers(zeroing=True)
    if model.cfg.attn_only:
        return [(f"blocks.{layer}.hook_attn_out", _zero_hook)]
    return [(f"blocks.{layer}.hook_attn_out", _zero_hook), (f"blocks.{layer}.hook_mlp_out", _zero_hook)]


def drop_layers(model: Model, layers: Sequence[int]) -> list[FwdHook]:
    """:func:`drop_layer` for several blocks at once.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=3, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu"))
        >>> len(drop_layers(m, [0, 2]))
        4
    """
    return [hook for layer in layers for hook in drop_layer(model, layer)]


def current_step(model: Model) -> tuple[int, int] | None:
    """``(step, block)`` of the block now running under :func:`stages_of_inference.run_plan`,
    :func:`stages_of_inference.reordered` or the sweep executor, for hooks that need the execution
    step as well as the block (a repeated block fires its hooks once per step). ``None`` outside.

    Example:
        >>> import torch
        >>> import stages_of_inference as soi
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu"))
        >>> seen = []
        >>> hook = ("blocks.1.hook_resid_pre", lambda x, hook: seen.append(current_step(m)))
        >>> _ = soi.run_plan(m, torch.tensor([[0, 1, 2]]), soi.LayerPlan.repeat(2, 1), fwd_hooks=[hook])
        >>> seen
        [(1, 1), (2, 1)]
    """
    return get_step(model)
