"""Silencing one sublayer of a ``TransformerBridge`` block, the way the family's modules allow.

A plan step that runs one sublayer (``(i, "mlp")``: block ``i`` without its attention) must remove
exactly what the other sublayer adds to the residual stream. On most families the sublayer's
output hook (``blocks.i.attn.hook_out``, which ``blocks.i.hook_attn_out`` aliases; likewise the
MLP's) holds that contribution, and zeroing it is right. On some, the Hugging Face module adds the
residual itself (Bloom's attention and MLP, MPT's MLP), so the hook holds *the residual plus the
contribution*: zeroing it wipes the residual stream. There the sublayer is silenced by passing the
residual through instead (the block's input for the attention, the residual entering the MLP,
``ln2.hook_in``, for the MLP).

Which of the two a family does is read off the model, not a list of families
(:func:`sublayer_forms`): one block call per layer on a few tokens, outside any plan. A sublayer
whose output equals the residual after it *carries* the residual; every other sublayer is zeroed.
Then both sublayers of every block are silenced that way and the block must return its input
unchanged: where it does not (norms after the residual sum, a post-norm block), no plan can remove
one sublayer's contribution, and sublayer plans are refused in one line. The finding is computed
once per model and kept with the library's other per-model state
(:func:`stages_of_inference.backends.state.remembered`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stages_of_inference.backends.state import exclusive, remembered

__all__ = ["SublayerForms", "silenced", "sublayer_forms"]

SUBLAYERS = ("attn", "mlp")
_AFTER_KEY = {"attn": "mid", "mlp": "post"}  # the residual after each sublayer, as _capture keeps it
_RESIDUAL_BEFORE = {"attn": "hook_in", "mlp": "ln2.hook_in"}  # and before it


@dataclass(frozen=True)
class SublayerForms:
    """How each block's sublayers write to the residual stream.

    Attributes:
        carries: per block, the sublayers whose output hook holds the residual plus their
            contribution (silenced by passing the residual through); the others are zeroed.
        problem: why no sublayer can be silenced on this model (one line), or ``""``.
    """

    carries: tuple[frozenset[str], ...]
    problem: str = ""

    def check(self) -> None:
        """Raise the one-line refusal where sublayer plans cannot be made."""
        if self.problem:
            raise ValueError(self.problem)


def _point(block: nn.Module, path: str) -> nn.Module | None:
    """``block``'s submodule at the dotted ``path``, or ``None``."""
    module: Any = block
    for name in path.split("."):
        module = getattr(module, name, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _output_point(block: nn.Module, sublayer: str) -> nn.Module:
    module = getattr(block, sublayer, None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"this block has no {sublayer!r} sublayer to silence")
    return getattr(module, "hook_out", module)


def _first(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def _replaced(output: Any, value: Tensor) -> Any:
    """``output`` (a tensor, or a tuple starting with one) with its first tensor replaced by ``value``."""
    return value if isinstance(output, Tensor) else (value, *output[1:])


@contextlib.contextmanager
def silenced(block: nn.Module, sublayer: str, carries: bool) -> Iterator[None]:
    """Inside the ``with``, ``block``'s ``sublayer`` adds nothing to the residual stream: its output
    is zeroed, or, where it ``carries`` the residual (module docstring), replaced by the residual
    that entered it. Installed before any other hook on the sublayer's output, so hooks there see
    what the block then writes.
    """
    target = _output_point(block, sublayer)
    if not carries:
        handle = target.register_forward_hook(lambda module, args, output: _replaced(output, torch.zeros_like(_first(output))),
                                              prepend=True)
        try:
            yield
        finally:
            handle.remove()
        return
    source = _point(block, _RESIDUAL_BEFORE[sublayer])
    if source is None:
        raise ValueError(f"cannot find the residual entering this block's {sublayer!r} ({_RESIDUAL_BEFORE[sublayer]})")
    entered: list[Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        entered[:] = [_first(output)]

    handles = [source.register_forward_hook(keep),
               target.register_forward_hook(lambda module, args, output: _replaced(output, entered[-1]), prepend=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _capture(block: nn.Module, seen: dict[str, Tensor]) -> list[Any]:
    """Hooks keeping, into ``seen``, the residual before and after the block and after each
    sublayer, and each sublayer's output.
    """
    def keep(key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen[key] = _first(output).detach()
        return hook

    points = {"pre": "hook_in", "post": "hook_out", "mid": "ln2.hook_in"}
    points.update({name: f"{name}.hook_out" for name in SUBLAYERS if getattr(block, name, None) is not None})
    return [point.register_forward_hook(keep(key)) for key, path in points.items()
            if (point := _point(block, path)) is not None]


def _close(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return False
    scale = float(b.float().abs().max()) + 1e-12
    return bool((a.float() - b.float()).abs().max() <= 1e-5 * scale)


def _find(seam: Any) -> SublayerForms:
    """:class:`SublayerForms` of the Bridge behind ``seam``, from one call of every block (module docstring)."""
    bridge = seam.model
    family = type(getattr(bridge, "original_model", bridge)).__name__
    tokens = (torch.arange(8) % seam.d_vocab)[None].to(seam.device)
    embedded = seam.embed(tokens)
    carries: list[frozenset[str]] = []
    for layer, block in enumerate(seam.blocks()):
        call = embedded.extras[layer]
        seen: dict[str, Tensor] = {}
        handles = _capture(block, seen)
        try:
            block(embedded.residual, *call.args, **call.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        present = [name for name in SUBLAYERS if name in seen]
        found = frozenset(name for name in present if _close(seen[name], seen.get(_AFTER_KEY[name])))
        with contextlib.ExitStack() as stack:
            for name in present:
                stack.enter_context(silenced(block, name, name in found))
            out = _first(block(embedded.residual, *call.args, **call.kwargs))
        if not _close(out, embedded.residual):
            return SublayerForms(tuple(carries), problem=(
                f"{family}: one sublayer cannot be silenced on this family (block {layer} with its attention and "
                "MLP silenced does not return its input: its sublayers do not simply add to the residual stream, "
                "e.g. a norm after the sum); whole-block plans (LayerPlan.drop, swap) are exact"))
        carries.append(found)
    return SublayerForms(tuple(carries))


def sublayer_forms(seam: Any) -> SublayerForms:
    """How the sublayers of the Bridge behind ``seam`` write to the residual (module docstring);
    found once per model, under its lock, by running every block once on eight tokens.
    """
    with exclusive(seam.model), torch.inference_mode():
        return remembered(seam.model, "sublayer_forms", lambda: _find(seam))
