"""Backends: the model seam (:class:`~stages_of_inference.backends.base.ModelSeam`) and its
adapters. :func:`as_seam` is the one place that looks at what kind of model it was given.
"""

from __future__ import annotations

from typing import Any

from stages_of_inference.backends.base import Embedded, ModelSeam

__all__ = ["Embedded", "ModelSeam", "as_seam", "backend_of"]


def as_seam(model: Any) -> ModelSeam:
    """The seam of ``model``: a ``HookedTransformer`` or a ``TransformerBridge`` is adapted; a
    seam is returned as it is.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu"))
        >>> as_seam(m).n_layers
        1
        >>> as_seam("gpt2")
        Traceback (most recent call last):
        ...
        TypeError: expected a TransformerLens HookedTransformer or TransformerBridge, got str; load one with stages_of_inference.load_model(name)
    """
    from stages_of_inference._tl import HAS_BRIDGE, HAS_HOOKED, HookedTransformer, TransformerBridge

    if HAS_HOOKED and isinstance(model, HookedTransformer):
        from stages_of_inference.backends.hooked import HookedSeam

        return HookedSeam(model)
    if HAS_BRIDGE and isinstance(model, TransformerBridge):
        from stages_of_inference.backends.bridge import BridgeSeam

        return BridgeSeam(model)
    if isinstance(model, ModelSeam) and not isinstance(model, type):
        return model
    raise TypeError(
        f"expected a TransformerLens HookedTransformer or TransformerBridge, got {type(model).__name__}; "
        "load one with stages_of_inference.load_model(name)"
    )


def backend_of(model: Any) -> str:
    """``"hooked"`` or ``"bridge"``: which backend ``model`` runs on (``"seam"`` for another seam).

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> backend_of(HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu")))
        'hooked'
    """
    from stages_of_inference.backends.bridge import BridgeSeam
    from stages_of_inference.backends.hooked import HookedSeam

    seam = as_seam(model)
    return "hooked" if isinstance(seam, HookedSeam) else "bridge" if isinstance(seam, BridgeSeam) else "seam"
