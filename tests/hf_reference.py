"""Hugging Face references computed with transformers' own code.

TransformerLens 3.9's Bridge (its issue #1795) replaces transformers' module-level Gemma 2 and
Gemma 3 attention function with a wrapper of its own, for the whole process, the first time any
Bridge is built. The tests' Hugging Face references run in the same process as their Bridges, so
they run inside :func:`transformers_own_attention`, which puts back the functions this module
found when it was first imported (by ``conftest.py``, before any test builds a Bridge).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import transformers.models.gemma2.modeling_gemma2 as gemma2
import transformers.models.gemma3.modeling_gemma3 as gemma3

PATCHED_BY_BRIDGES = (gemma2, gemma3)
OWN_ATTENTION = {module: module.eager_attention_forward for module in PATCHED_BY_BRIDGES}
assert all(fn.__module__ == module.__name__ for module, fn in OWN_ATTENTION.items()), \
    "imported after a Bridge was built: the Gemma attention functions found are not transformers' own"


@contextlib.contextmanager
def transformers_own_attention() -> Iterator[None]:
    """Inside the ``with``, transformers' Gemma 2 and 3 modules hold their own attention function."""
    now = {module: module.eager_attention_forward for module in PATCHED_BY_BRIDGES}
    try:
        for module, fn in OWN_ATTENTION.items():
            module.eager_attention_forward = fn
        yield
    finally:
        for module, fn in now.items():
            module.eager_attention_forward = fn
