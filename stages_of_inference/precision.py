"""Computing precision: which dtype a model's matrix products and attention run in.

A *precision* applies to a model loaded in fp32 (the paper's setting, and the default):

* ``"fp32"``: everything in fp32, exactly as before this setting existed;
* ``"bf16"``: the matrix products and the attention of every block and of the unembedding in
  bfloat16 (fp32 accumulation inside each product, bf16 out), the residual stream, the norms and
  the embeddings in fp32, and every metric (log-softmax, KL, entropy, loss, top-1) in fp32 or wider
  from the logits;
* ``"fp16"``: the same with float16 (on a CPU without fp16 matrix units it is very slow: for
  checking a GPU's numbers on a CPU, not for speed).

The residual stream stays fp32 because it is a long running sum: each block adds a small update
to a large vector, and rounding the sum to bf16 (8 significant bits) after every block is what
moves a pure-bf16 model's numbers most (docs/precision.md measures both).

The sweep's fast path implements this directly (bf16 copies of the weights, made once per batch);
every other forward runs under :func:`autocast`, torch's automatic mixed precision, which casts the
inputs of matrix products and attention to the low precision and leaves sums in fp32.

Example:
    >>> check_precision("bf16"), compute_dtype("bf16")
    ('bf16', torch.bfloat16)
    >>> check_precision("int8")
    Traceback (most recent call last):
    ...
    ValueError: precision must be one of 'fp32', 'bf16', 'fp16', got 'int8'
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

from stages_of_inference._checks import PRECISIONS, check_precision

__all__ = ["PRECISIONS", "autocast", "check_model_precision", "check_precision", "compute_dtype"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matrix products run in under ``precision``."""
    return _DTYPES[check_precision(precision)]


def check_model_precision(weights_dtype: torch.dtype, precision: str, device: str | torch.device) -> str:
    """``precision`` if it can apply to a model whose weights are ``weights_dtype`` on ``device``.

    A low precision applies to a model loaded in fp32 (the weights are cast once per batch); a model
    already loaded in a low dtype runs as it is, with ``precision="fp32"`` only. fp16 on a CPU is
    allowed with a warning (correct, but tens of times slower than fp32 there).

    Example:
        >>> import torch
        >>> check_model_precision(torch.bfloat16, "bf16", "cpu")
        Traceback (most recent call last):
        ...
        ValueError: precision='bf16' applies to a model loaded in fp32, but its weights are torch.bfloat16: load it with dtype=torch.float32, or leave precision='fp32' to run it as it is
    """
    precision = check_precision(precision)
    if precision != "fp32" and weights_dtype != torch.float32:
        raise ValueError(f"precision={precision!r} applies to a model loaded in fp32, but its weights are {weights_dtype}: "
                         "load it with dtype=torch.float32, or leave precision='fp32' to run it as it is")
    if precision == "fp16" and torch.device(device).type == "cpu":
        warnings.warn("precision='fp16' on a CPU: the numbers are right but most CPUs have no fp16 matrix units, so it "
                      "runs far slower than fp32; use 'bf16' for speed", stacklevel=3)
    return precision


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager[Any]:
    """A context in which a model's forward computes under ``precision`` on ``device``: nothing
    changes for ``"fp32"``; otherwise torch's autocast to the low dtype (matrix products and
    attention low, sums and reductions as their inputs).

    Example:
        >>> import torch
        >>> with autocast("bf16", "cpu"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=compute_dtype(precision))
