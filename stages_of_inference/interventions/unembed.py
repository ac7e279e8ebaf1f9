"""The sweep's unembedding: final-norm residual rows to logits, in one of three ways.

* :class:`ModuleUnembedding`: through the model's own unembedding module, so that its hook points
  fire (the caller passed hooks, or a hook is attached to the module);
* :class:`BlockedUnembedding`: the hot path, :attr:`~BlockedUnembedding.block_size` vocabulary
  columns at a time into a buffer that stays in cache, taking each block's largest logit while it
  is there, so a row's top-1 costs a pass over one block instead of the whole vocabulary;
* :class:`PlainUnembedding`: one ``F.linear`` (weights that are not fp32).

:func:`make_unembedding` picks one. Each returns ``(logits, row_max)``, with ``row_max`` the value
and (first) index of each row's largest logit where it was had for free, else ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.utilities import apply_softcap

from stages_of_inference.precision import autocast, compute_dtype

__all__ = ["BlockedUnembedding", "ModuleUnembedding", "PlainUnembedding", "RowMax", "UNEMBED_BLOCK", "Unembedding",
    "make_unembedding", "row_max"]

UNEMBED_BLOCK = 1024
"""Default vocabulary columns :class:`BlockedUnembedding` computes at a time."""

RowMax = tuple[Float[Tensor, " n"], Int[Tensor, " n"]]


def row_max(
    logits: Float[Tensor, "n d_vocab"], block_max: Float[Tensor, "n_blocks n"], block_size: int
) -> RowMax:
    """The largest logit of each row and its index (the first, on ties, as ``Tensor.max(dim)``),
    from ``block_max``, the largest of each row in each block of ``block_size`` columns: only the
    first block holding the row's maximum is searched.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1., 5., 5., 0.], [2., 0., 1., 2.]])
        >>> bm = torch.stack([x[:, :2].amax(1), x[:, 2:].amax(1)])
        >>> [t.tolist() for t in row_max(x, bm, 2)]
        [[5.0, 2.0], [1, 0]]
    """
    top, block = block_max.max(dim=0)  # the first block with the maximum
    top = top.to(logits.dtype)
    width = min(block_size, logits.shape[1])
    start = block * block_size
    cols = (start.unsqueeze(1) + torch.arange(width, device=logits.device)).clamp_(max=logits.shape[1] - 1)
    # past the vocabulary's end, the last column repeats: it cannot come before its first copy
    return top, start + logits.gather(1, cols).argmax(dim=1)


@dataclass
class ModuleUnembedding:
    """Logits through the model's unembedding module (its hook points fire), soft-capped; with a
    ``precision`` other than ``"fp32"`` the module runs under :func:`~stages_of_inference.precision.autocast`.
    """

    module: nn.Module
    softcap: float = 0.0
    precision: str = "fp32"
    scale: float = 1.0

    def __call__(self, x: Float[Tensor, "n d_model"]) -> tuple[Tensor, RowMax | None]:
        """The logits of the rows ``x`` (no row maxima)."""
        with autocast(self.precision, x.device):
            logits = self.module(x.unsqueeze(0)).squeeze(0)
        logits = logits.float() if self.scale == 1.0 else logits.float() * self.scale
        return apply_softcap(logits, self.softcap), None


@dataclass
class PlainUnembedding:
    """Logits as TransformerLens computes them (``F.linear`` with ``W_U`` transposed), soft-capped."""

    W_U: Float[Tensor, "d_model d_vocab"]
    b_U: Float[Tensor, " d_vocab"]
    softcap: float = 0.0
    w_t: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.w_t = self.W_U.T.contiguous()  # once per batch, not once per chunk

    def __call__(self, x: Float[Tensor, "n d_model"]) -> tuple[Tensor, RowMax | None]:
        """The logits of the rows ``x`` (no row maxima)."""
        return apply_softcap(F.linear(x, self.w_t, self.b_U), self.softcap), None


@dataclass
class BlockedUnembedding:
    """What ``F.linear`` computes, :attr:`block_size` vocabulary columns at a time, the products in
    :attr:`dtype` (fp32, or a low precision: the weights are cast once, each row once per call),
    the logits returned in fp32.

    Each block's product lands in a small buffer that stays in cache and is copied into the
    logits buffer (12-16 % faster on a CPU than one matmul writing all the logits); the block's
    row maxima are taken while it is in cache (``Tensor.max(dim)`` with indices is six times
    slower than ``amax`` on a CPU). The returned logits are a view of a buffer reused by the next
    call. At most ``max_rows`` rows a call.

    Example:
        >>> import torch
        >>> w, b, x = torch.randn(4, 10), torch.randn(10), torch.randn(3, 4)
        >>> logits, (top, top1) = BlockedUnembedding(w, b, max_rows=3, block_size=4)(x)
        >>> bool(torch.allclose(logits, x @ w + b, atol=1e-5)), torch.equal(top1, (x @ w + b).argmax(1))
        (True, True)
    """

    W_U: Float[Tensor, "d_model d_vocab"]
    b_U: Float[Tensor, " d_vocab"]
    max_rows: int
    softcap: float = 0.0
    block_size: int = UNEMBED_BLOCK
    dtype: torch.dtype = torch.float32
    w_t: Tensor = field(init=False, repr=False)
    _bias: Tensor = field(init=False, repr=False)
    _logits: Tensor = field(init=False, repr=False)
    _block: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.block_size < 1:
            raise ValueError(f"max_rows and block_size must be at least 1, got {self.max_rows}, {self.block_size}")
        d_vocab = self.W_U.shape[1]
        self.w_t = self.W_U.T.contiguous().to(self.dtype)
        self._bias = self.b_U.to(self.dtype)
        self._logits = self.W_U.new_empty((self.max_rows, d_vocab), dtype=torch.float32)
        self._block = self.W_U.new_empty(self.max_rows * min(self.block_size, d_vocab), dtype=self.dtype)

    def __call__(self, x: Float[Tensor, "n d_model"]) -> tuple[Tensor, RowMax | None]:
        """The logits of the rows ``x`` (a view of the reused buffer) and their row maxima."""
        n, d_vocab = x.shape[0], self.W_U.shape[1]
        if n > self.max_rows:
            raise ValueError(f"at most {self.max_rows} rows a call, got {n}")
        out = self._logits[:n]
        x = x.to(self.dtype)
        block_max = x.new_empty(-(-d_vocab // self.block_size), n)
        for j, v0 in enumerate(range(0, d_vocab, self.block_size)):
            v1 = min(v0 + self.block_size, d_vocab)
            part = self._block[: n * (v1 - v0)].view(n, v1 - v0)
            torch.addmm(self._bias[v0:v1], x, self.w_t[v0:v1].t(), out=part)
            torch.amax(part, dim=1, out=block_max[j])
            out[:, v0:v1] = part
        if self.softcap > 0:
            return apply_softcap(out, self.softcap), None
        return out, row_max(out, block_max, self.block_size)


Unembedding = ModuleUnembedding | PlainUnembedding | BlockedUnembedding


def make_unembedding(
    module: nn.Module, W_U: Tensor, b_U: Tensor, softcap: float, via_module: bool, max_rows: int,
    block_size: int = UNEMBED_BLOCK, precision: str = "fp32", module_scale: float = 1.0,
) -> Unembedding:
    """The unembedding the sweep uses: through ``module`` when a hook could see it
    (``via_module``; its output multiplied by ``module_scale``, the family's output scale, which
    ``W_U`` and ``b_U`` already carry), else blocked for fp32 weights ``W_U`` (products under
    ``precision``), else plain (weights loaded in another dtype, computed as they are).

    Example:
        >>> import torch
        >>> w, b = torch.randn(4, 10), torch.zeros(10)
        >>> type(make_unembedding(torch.nn.Identity(), w, b, 0.0, False, max_rows=8)).__name__
        'BlockedUnembedding'
        >>> type(make_unembedding(torch.nn.Identity(), w.double(), b.double(), 0.0, False, max_rows=8)).__name__
        'PlainUnembedding'
    """
    if via_module:
        return ModuleUnembedding(module, softcap, precision, module_scale)
    if W_U.dtype == torch.float32:
        return BlockedUnembedding(W_U, b_U, max_rows, softcap, block_size, compute_dtype(precision))
    return PlainUnembedding(W_U, b_U, softcap)
