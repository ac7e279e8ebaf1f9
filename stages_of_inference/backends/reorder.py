"""What a model held before it was reordered, while a :func:`~stages_of_inference.reordered` block
is active: the one piece of state both seams keep about a model between calls.

Reorderings nest (``with reordered(m, a): with reordered(m, b): ...``; the inner plan names the
original blocks), so an inner one must find what the outermost one replaced: the original block
list on a ``HookedTransformer``, the original layer types on a ``TransformerBridge``. The
outermost reordering records it here with :func:`outermost` for as long as it lasts; a seam
reads it with :func:`original`. Nothing else is kept on, or about, a model.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any, TypeVar

__all__ = ["original", "outermost"]

T = TypeVar("T")

_ORIGINALS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def outermost(model: Any, current: T) -> Iterator[T]:
    """Inside a reordering of ``model``: yields what the outermost reordering found (``current``,
    for the outermost itself, which records it until it ends).

    Example:
        >>> class M: pass
        >>> m = M()
        >>> with outermost(m, "blocks a, b") as a:
        ...     with outermost(m, "blocks b, a") as b:
        ...         print(a, "|", b, "|", original(m, "now"))
        blocks a, b | blocks a, b | blocks a, b
        >>> original(m, "now")
        'now'
    """
    if model in _ORIGINALS:
        yield _ORIGINALS[model]
        return
    _ORIGINALS[model] = current
    try:
        yield current
    finally:
        _ORIGINALS.pop(model, None)


def original(model: Any, default: T) -> T:
    """What the outermost active reordering of ``model`` found, or ``default`` when it is not
    reordered.
    """
    return _ORIGINALS.get(model, default)
