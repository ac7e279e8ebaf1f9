"""Backends: the model seam (:class:`~stages_of_inference.backends.base.ModelSeam`) and its
adapters. :func:`as_seam` is the one place that looks at what kind of model it was given.
"""

from __future__ import annotations

from typing import Any

from stages_of_inference._tl import HAS_BRIDGE, HAS_HOOKED, HookedTransformer, TransformerBridge
from stages_of_inference.backends.base import Embedded, ModelSeam, output_logits
from stages_of_inference.backends.bridge import BridgeSeam
from stages_of_inference.backends.hooked import HookedSeam

__all__ = ["Embedded", "ModelSeam", "as_seam", "backend_of", "output_logits", "require_processed_weights", "weight_mode"]


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
    if HAS_HOOKED and isinstance(model, HookedTransformer):
        return HookedSeam(model)
    if HAS_BRIDGE and isinstance(model, TransformerBridge):
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
    seam = as_seam(model)
    return "hooked" if isinstance(seam, HookedSeam) else "bridge" if isinstance(seam, BridgeSeam) else "seam"


def weight_mode(model: Any) -> str:
    """How the model's weights are held: ``"processed"`` (a ``HookedTransformer``, or a Bridge in
    compatibility mode: final norms folded into the next weights, writing weights and the
    unembedding centred), ``"raw"`` (a Bridge as Hugging Face stores it), or ``"seam"`` for another
    seam. Recorded in every result's provenance.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> weight_mode(HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu")))
        'processed'
    """
    backend = backend_of(model)
    if backend == "bridge":
        return "processed" if getattr(as_seam(model).model, "compatibility_mode", False) else "raw"
    return "processed" if backend == "hooked" else "seam"


def require_processed_weights(model: Any, what: str) -> None:
    """Refuse, in one line, an analysis whose convention reads processed weights (the final norm's
    weight folded into ``W_U``) on a Bridge that holds raw ones.
    """
    if weight_mode(model) == "raw":
        raise ValueError(f"{what} reads processed weights (the final norm folded into W_U, as the paper's "
                         "neuron analyses assume), but this TransformerBridge holds raw ones: call "
                         "bridge.enable_compatibility_mode() first (stages_of_inference.load_model does)")
