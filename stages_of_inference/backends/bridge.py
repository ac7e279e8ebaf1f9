"""The :class:`~stages_of_inference.backends.base.ModelSeam` of a TransformerLens
``TransformerBridge`` (TransformerLens 3.9 and 4.x): a Hugging Face model whose modules the Bridge
has wrapped with hook points.

The Bridge cannot run its blocks in another order (its ``start_at_layer`` still runs the earlier
blocks), so this seam runs them itself. :meth:`BridgeSeam.embed` runs the unmodified model once and
records, per layer (by its index, not by when it ran), the arguments the Hugging Face forward
passes to that layer: the rotary tables, the attention mask, the position ids (each layer replaced
by a recorder for that pass, so it costs the embedding only). Gemma 3 gives its
sliding-window and global layers different masks and rotary tables; a layer run at another step of
a plan gets its own. :meth:`BridgeSeam.run_block` then calls ``bridge.blocks[i]`` with them, so
every hook of the block fires under its own name. Position ids are checked against the ones an
unpadded batch has (``0 .. T-1``): the engine never pads. No key-value cache is used.

The fast path and plan stacking run on the Bridge where its layers are ones
:mod:`~stages_of_inference.backends.bridge_fast` reproduces (Llama-style); elsewhere every block
runs as itself, one plan at a time.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.utilities import apply_softcap

from stages_of_inference.backends.base import ConfigFields, Embedded, FwdHooks
from stages_of_inference.backends.bridge_fast import BridgeFastBlocks
from stages_of_inference.backends.kernels import has_hooks
from stages_of_inference.backends.state import outermost
from stages_of_inference.backends.step import get_step, set_step
from stages_of_inference.backends.sublayers import silenced, sublayer_forms

__all__ = ["BridgeSeam", "LayerCall", "reordered_layers"]

_DROPPED_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache", "use_cache", "output_attentions",
                   "cache_position")


@dataclass(frozen=True)
class LayerCall:
    """What the Hugging Face forward passed to one layer besides the residual.

    Attributes:
        args: positional arguments after the hidden states.
        kwargs: keyword arguments (without any cache).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Recorded(Exception):
    """Raised once the last layer's arguments are recorded: the rest of the forward is not needed."""


def _first_tensor(output: Any) -> Tensor:
    """A block's output residual (Hugging Face layers return a tensor or a tuple starting with one)."""
    return output if isinstance(output, Tensor) else output[0]


@contextlib.contextmanager
def only_part(block: nn.Module, part: str, carries: frozenset[str]) -> Iterator[None]:
    """Only ``part`` of ``block`` writes to the residual: the other sublayer is silenced at its
    output hook point (zeroed, or passed the residual where it ``carries`` it:
    :func:`~stages_of_inference.backends.sublayers.silenced`), before any hook there sees it.
    """
    if part == "block":
        yield
        return
    other = {"attn": "mlp", "mlp": "attn"}.get(part)
    if other is None:
        raise ValueError(f"unknown sublayer {part!r}; allowed: 'block', 'attn', 'mlp'")
    with silenced(block, other, other in carries):
        yield


class BridgeSeam(ConfigFields):
    """A ``TransformerBridge`` behind the model seam.

    Args:
        bridge: the Bridge (in compatibility mode for the paper's conventions:
            :func:`stages_of_inference.models.load_model` boots it so).
    """

    def __init__(self, bridge: Any) -> None:
        self._bridge = bridge

    @property
    def model(self) -> Any:
        return self._bridge

    def blocks(self) -> Sequence[nn.Module]:
        return tuple(self._bridge.blocks)

    # ------------------------------------------------------------------------- running
    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Embedded:
        """Run the model's own forward with every layer replaced by a recorder: the residual
        entering layer 0 and every layer's call arguments are kept, no layer computes anything (so
        no hook inside a block fires), and the forward stops at the last layer (before the final
        norm). The embedding runs as itself, its hooks included.
        """
        blocks = self.blocks()
        calls: dict[int, LayerCall] = {}
        first: list[Tensor] = []

        def recorder(layer: int) -> Any:
            def record(*args: Any, **kwargs: Any) -> Any:
                hidden = args[0] if args else kwargs["hidden_states"]
                kept = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS and k != "hidden_states"}
                calls[layer] = LayerCall(tuple(args[1:]), kept)
                if layer == 0:
                    first.append(hidden)
                if layer == len(blocks) - 1:
                    raise _Recorded
                return hidden  # never read: only the arguments of the later layers are
            return record

        for i, block in enumerate(blocks):
            vars(block)["forward"] = recorder(i)  # an instance attribute shadows the class's forward
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        try:
            self._bridge.original_model(input_ids=tokens, position_ids=positions, use_cache=False)
        except _Recorded:
            pass
        finally:
            for block in blocks:
                vars(block).pop("forward", None)
        if len(calls) != len(blocks):
            raise RuntimeError(f"the forward pass called {len(calls)} of the {len(blocks)} layers; cannot record them")
        for layer, call in calls.items():
            ids = call.kwargs.get("position_ids")
            if ids is not None and not torch.equal(ids.expand(tokens.shape[0], -1).cpu(),
                                                   positions.expand(tokens.shape[0], -1).cpu()):
                raise ValueError(f"layer {layer} received position ids other than 0 .. T-1; the engine runs unpadded "
                                 "batches only")
        return Embedded(first[0], calls, plain=False)

    def run_block(self, layer: int, residual: Tensor, embedded: Embedded, step: int, part: str = "block") -> Tensor:
        call: LayerCall = embedded.extras[layer]
        block = self.blocks()[layer]
        set_step(self._bridge, (step, layer))
        with only_part(block, part, sublayer_forms(self).carries[layer] if part != "block" else frozenset()):
            return _first_tensor(block(residual, *call.args, **call.kwargs))

    def reordered(self, steps: Sequence[tuple[int, str]]) -> contextlib.AbstractContextManager[None]:
        return reordered_layers(self._bridge, steps)

    def check_sublayers(self, zeroing: bool = False) -> None:
        """Refuse, in one line, plans that run one sublayer where this family's blocks do not
        allow removing one (:mod:`~stages_of_inference.backends.sublayers`); with ``zeroing``,
        also where a sublayer's output hook holds the residual (hooks that zero it would wipe
        the residual stream).
        """
        forms = sublayer_forms(self)
        forms.check()
        carrying = sorted({name for found in forms.carries for name in found})
        if zeroing and carrying:
            family = type(getattr(self._bridge, "original_model", self._bridge)).__name__
            raise ValueError(
                f"{family}: blocks.i.hook_{carrying[0]}_out holds the residual plus the sublayer's output on this "
                "family, so zeroing it wipes the residual stream; delete blocks with LayerPlan.drop(n, i) and "
                "run_plan, or sublayers with LayerPlan.drop_attention / drop_mlp")

    def final_norm(self, residual: Tensor) -> Tensor:
        return self._bridge.ln_final(residual)

    @property
    def unembed_module(self) -> nn.Module:
        return self._bridge.unembed

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self._bridge.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self._bridge.b_U

    @property
    def softcap(self) -> float:
        cap = getattr(self._bridge.cfg, "output_logits_soft_cap", None)
        return float(cap) if cap is not None and cap > 0 else 0.0

    @functools.cached_property
    def logit_scale(self) -> float:
        """Read off the architecture adapter's own output transform (what the Bridge's forward
        applies after ``lm_head``): its slope at zero, checked to be the whole transform (a scale,
        then the soft-cap); a family whose transform is anything else is refused in one line.
        """
        transform = getattr(getattr(self._bridge, "adapter", None), "apply_output_logits_transform", None)
        if transform is None:
            return 1.0
        with torch.no_grad():
            tiny = torch.tensor([[1e-3]], dtype=torch.float32)
            scale = float(transform(tiny.clone())[0, 0]) / 1e-3
            probe = torch.linspace(-40.0, 40.0, 81, dtype=torch.float32)[None]
            found, expected = transform(probe.clone()), apply_softcap(probe * scale, self.softcap)
        if not torch.allclose(found, expected, rtol=1e-4, atol=1e-4):
            raise NotImplementedError(
                f"{type(self._bridge.adapter).__name__}: this family's output transform is not a scale and a soft-cap, "
                "which the library cannot reproduce outside the Bridge's own forward; supported: scaled or "
                "soft-capped logits (docs/backends.md)")
        return 1.0 if abs(scale - 1.0) < 1e-6 else scale

    def W_out(self, layer: int) -> Float[Tensor, "d_mlp d_model"] | None:
        mlp = getattr(self.blocks()[layer], "mlp", None)
        return getattr(mlp, "W_out", None) if mlp is not None else None

    def hooks(self, fwd_hooks: FwdHooks) -> contextlib.AbstractContextManager[Any]:
        return self._bridge.hooks(fwd_hooks=list(fwd_hooks))

    def has_hooks(self, module: nn.Module) -> bool:
        return has_hooks(module)

    def fast_blocks(self, embedded: Embedded, enabled: bool, dtype: torch.dtype | None = None) -> Any:
        """The Bridge's fast path for this batch (:mod:`~stages_of_inference.backends.bridge_fast`),
        or ``None`` where no block may take it.
        """
        if not enabled:
            return None
        fast = BridgeFastBlocks(self._bridge, embedded.extras, embedded.residual.shape[1], dtype)
        return fast if any(fast.allowed) else None

    def loss(self, logits: Tensor, tokens: Tensor, embedded: Embedded) -> Tensor:
        """Mean next-token cross-entropy over every position with a next token (TransformerLens' loss)."""
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


class _OneStep(nn.Module):
    """A block in one slot of the Hugging Face layer list, run as one plan step: the step counter
    moves when it runs, and for a sublayer step only that sublayer writes to the residual. Every
    other attribute is the block's (Hugging Face forwards read some, such as Gemma 3's
    ``attention_type``, which picks the layer's mask).
    """

    def __init__(self, bridge: Any, block: nn.Module, layer: int, part: str, counter: list[int],
                 carries: frozenset[str]) -> None:
        super().__init__()
        self._inner = (bridge, block, layer, part, counter, carries)  # a tuple: not registered as submodules

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bridge, block, layer, part, counter, carries = self._inner
        counter[0] += 1
        set_step(bridge, (counter[0], layer))
        kept = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}  # no key-value cache
        with only_part(block, part, carries):
            return block(*args, **kept)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_inner"][1], name)


def _layer_list(bridge: Any) -> tuple[nn.Module, str]:
    """The module of the Hugging Face model that holds the layer list its forward loops over (the
    list whose items are the Bridge's blocks, or an enclosing :func:`reordered_layers`' steps), and
    the attribute's name.
    """
    first = bridge.blocks[0]
    for module in bridge.original_model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) and (child[0] is first or isinstance(child[0], _OneStep)):
                return module, name
    raise NotImplementedError("cannot find the layer list of this Bridge's Hugging Face model; reordered() needs it")


@contextlib.contextmanager
def reordered_layers(bridge: Any, steps: Sequence[tuple[int, str]]) -> Iterator[None]:
    """The Bridge's own forward runs ``steps`` (``(block, part)`` pairs, ``part`` ``"block"``,
    ``"attn"`` or ``"mlp"``): the Hugging Face layer list is replaced by the blocks in that order
    (the same modules, so hooks keep their names), with the number of layers the forward loops over
    set to match; both are put back on exit, exceptions included. The step counter starts again at
    every embedding. Nested, the inner steps name the original blocks and replace the outer order
    until the inner exits.
    """
    holder, name = _layer_list(bridge)
    original = tuple(bridge.blocks)
    counter = [-1]
    forms = sublayer_forms(BridgeSeam(bridge)) if any(part != "block" for _, part in steps) else None
    if forms is not None:
        forms.check()
    layers = nn.ModuleList([_OneStep(bridge, original[layer], layer, part, counter,
                                     forms.carries[layer] if forms is not None else frozenset())
                            for layer, part in steps])
    config = bridge.original_model.config
    sized = [key for key in ("num_hidden_layers", "n_layer") if isinstance(getattr(config, key, None), int)]
    before = {key: getattr(config, key) for key in (*sized, "layer_types") if hasattr(config, key)}
    previous, previous_step = getattr(holder, name), get_step(bridge)
    handle = bridge.embed.register_forward_pre_hook(lambda module, args: counter.__setitem__(0, -1))
    # the forward picks each slot's mask and rotary tables by config.layer_types[slot]: a moved
    # layer must get its own (Gemma 3's sliding-window and global layers differ); nested, the
    # original types are the ones the outermost reordering found
    changed: dict[str, Any] = {}
    with outermost(bridge, before.get("layer_types")) as types:
        try:
            setattr(holder, name, layers)
            for key in sized:
                changed[key] = before[key]
                setattr(config, key, len(layers))
            if isinstance(types, (list, tuple)) and len(types) == len(original):
                _set_layer_types(config, [types[layer] for layer, _ in steps], changed, before)
            yield
        finally:
            setattr(holder, name, previous)
            for key, value in changed.items():
                setattr(config, key, value)
            handle.remove()
            set_step(bridge, previous_step)


def _set_layer_types(config: Any, moved: list[Any], changed: dict[str, Any], before: dict[str, Any]) -> None:
    """Give each slot the type of the layer now in it; where the config derives its types and
    cannot be told (Falcon-H1's), that is fine only if the types stay as they are slot by slot.
    """
    try:
        config.layer_types = moved
        changed["layer_types"] = before["layer_types"]
    except AttributeError:
        now = list(getattr(config, "layer_types", None) or [])
        if now != moved[:len(now)] or len(now) < len(moved):
            raise NotImplementedError(
                f"{type(config).__name__} derives its layer types and cannot take them reordered, and this plan "
                "moves a layer to a slot of another type; use run_plan and robustness_sweep, which run the blocks "
                "themselves") from None
