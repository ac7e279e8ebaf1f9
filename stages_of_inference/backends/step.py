"""Which block is running, and at which step of a plan: the state hooks read through
:func:`stages_of_inference.hooks.current_step`.

The state lives in a :class:`contextvars.ContextVar` (one value per thread and asyncio task),
keyed by the model it belongs to, never as an attribute of the model.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

__all__ = ["get_step", "set_step"]

_STEP: ContextVar[tuple[Any, tuple[int, int]] | None] = ContextVar("stages_of_inference_step", default=None)


def set_step(model: Any, step: tuple[int, int] | None) -> None:
    """Record that ``model`` now runs ``(step, block)``; ``None``: no block of it is running."""
    _STEP.set(None if step is None else (model, step))


def get_step(model: Any) -> tuple[int, int] | None:
    """``(step, block)`` of ``model``'s running block, or ``None``.

    Example:
        >>> m = object()
        >>> set_step(m, (2, 1)); get_step(m), get_step(object())
        ((2, 1), None)
        >>> set_step(m, None); get_step(m) is None
        True
    """
    value = _STEP.get()
    return value[1] if value is not None and value[0] is model else None
