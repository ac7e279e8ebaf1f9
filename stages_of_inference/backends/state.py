"""The state the library keeps about a model between calls, in one place: who is using it (a
per-model lock, :func:`exclusive`), and what it held before it was reordered (:func:`outermost`).

**One thread at a time per model.** Hooks and block orders are state of the model: a hook one
thread installs fires inside another thread's forward pass. Every entry point of the library that
runs a model, installs hooks on it or reorders it holds the model's lock for as long as it does
(``run_plan``, a ``reordered`` block, each batch of a sweep, of ``collect`` and of the lens, a
greedy continuation), so analyses started from several threads on one model are serialised and
each gives the numbers it gives alone. The lock is re-entrant (a ``reordered`` block may run a
sweep in the same thread). Your own calls of the model's forward are not covered: hold
``exclusive(model)`` around them when other threads use the model through this library. Do not
wait, inside an entry point or a ``reordered`` block, for another thread that uses the same model.

**Reorderings nest** (``with reordered(m, a): with reordered(m, b): ...``; the inner plan names the
original blocks), so an inner one must find what the outermost one replaced: the original block
list on a ``HookedTransformer``, the original layer types on a ``TransformerBridge``. The
outermost reordering records it here with :func:`outermost` for as long as it lasts; a seam
reads it with :func:`original`.

**Facts found by running the model** (how its sublayers write to the residual stream) are worked
out once and kept for as long as the model lives (:func:`remembered`). Nothing else is kept on, or
about, a model.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["exclusive", "original", "outermost", "recalled", "remembered"]

T = TypeVar("T")

_ORIGINALS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_FACTS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def exclusive(model: Any) -> Iterator[None]:
    """Hold ``model`` for this thread for the ``with`` block: another thread entering waits until
    it ends; the same thread may enter again (module docstring).

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> with exclusive(m), exclusive(m):
        ...     print("held twice by one thread")
        held twice by one thread
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
    with lock:
        yield


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


def remembered(model: Any, key: str, find: Callable[[], T]) -> T:
    """The fact ``key`` about ``model``: ``find()`` the first time it is asked, the same object
    after that, for as long as the model lives. Hold ``exclusive(model)`` around it when ``find``
    runs the model.

    Example:
        >>> class M: pass
        >>> m = M()
        >>> remembered(m, "answer", lambda: 42), remembered(m, "answer", lambda: 0)
        (42, 42)
    """
    facts = _FACTS.setdefault(model, {})
    if key not in facts:
        facts[key] = find()
    return facts[key]


def recalled(model: Any, key: str) -> Any:
    """The fact ``key`` :func:`remembered` about ``model``, or ``None`` where none was.

    Example:
        >>> class M: pass
        >>> recalled(M(), "answer") is None
        True
    """
    return _FACTS.get(model, {}).get(key)
