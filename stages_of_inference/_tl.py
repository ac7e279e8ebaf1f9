"""Which TransformerLens is installed, and its model classes, in one place.

TransformerLens 3.9 ships both ``HookedTransformer`` and ``TransformerBridge``; 4.x removed
``HookedTransformer`` (importing it raises). Modules of this package import the classes from here,
so the package imports under either version; :data:`Model` is what a public function that takes a
model accepts (the classes the installed version has).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any, Union

__all__ = ["BACKENDS", "HAS_BRIDGE", "HAS_HOOKED", "HookedTransformer", "HookedTransformerConfig", "Model",
           "TL_VERSION", "TransformerBridge", "backends_available"]

BACKENDS = ("hooked", "bridge")
"""The backends the library knows: TransformerLens' ``HookedTransformer`` and its ``TransformerBridge``."""

try:
    TL_VERSION = version("transformer-lens")
except PackageNotFoundError:  # a source checkout of TransformerLens
    TL_VERSION = "unknown"

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    HAS_HOOKED = True
except ImportError:  # TransformerLens 4 removed them: stand-ins nothing is an instance of
    HAS_HOOKED = False

    class _Removed:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError(f"{type(self).__name__} needs TransformerLens 3.9 (installed: {TL_VERSION}); on "
                              "TransformerLens 4 load models with stages_of_inference.load_model(name, backend='bridge')")

    class HookedTransformer(_Removed):  # type: ignore[no-redef]
        """TransformerLens 3's ``HookedTransformer``, which the installed TransformerLens lacks."""

    class HookedTransformerConfig(_Removed):  # type: ignore[no-redef]
        """TransformerLens 3's ``HookedTransformerConfig``, which the installed TransformerLens lacks."""

try:
    from transformer_lens.model_bridge import TransformerBridge

    HAS_BRIDGE = True
except ImportError:  # an old TransformerLens without the Bridge
    TransformerBridge = None  # type: ignore[assignment,misc]
    HAS_BRIDGE = False

_classes = tuple(c for c, ok in ((HookedTransformer, HAS_HOOKED), (TransformerBridge, HAS_BRIDGE)) if ok)
Model: Any = Union[_classes] if len(_classes) > 1 else (_classes[0] if _classes else Any)  # noqa: UP007
"""A model the library accepts: a ``HookedTransformer`` or a ``TransformerBridge`` (whichever exist)."""


def backends_available() -> tuple[str, ...]:
    """The backends the installed TransformerLens supports, the default first.

    Example:
        >>> backends_available()[0] in BACKENDS
        True
    """
    return tuple(name for name, ok in (("hooked", HAS_HOOKED), ("bridge", HAS_BRIDGE)) if ok)
