"""Attention sinks, massive activations and residual norms, block by block (beyond the paper).

Two properties of trained transformers bear on why their first and last blocks are fragile. Many
heads park most of their attention on the first token, an *attention sink* (Gu et al. 2024,
arXiv:2410.10781, "When Attention Sink Emerges in Language Models"), and a few residual features
take values thousands of times the typical one, *massive activations*, at fixed dimensions and
usually on the first token (Sun et al. 2024, arXiv:2402.17762). Both switch on within the first
blocks, the ones whose deletion the paper finds costly. :func:`sink_profile` measures, before
every block, in one forward pass with no cache kept:

* ``sink_attention``: the mean attention weight paid to position 0 by every head from every query
  after it (queries ``1 .. T-1``), and its standard error over sequences;
* ``sink_heads_share``: the share of the block's heads whose mean attention to position 0 (over
  those queries and all sequences) exceeds 0.5;
* ``max_abs_activation``: the largest absolute value in the residual stream entering the block,
  over all sequences, positions and dimensions, with the ``max_position`` and ``max_dimension``
  where it sits; ``median_abs_activation``: the median over sequences of each sequence's median
  absolute residual value; ``massive_ratio``: the first over the second;
* ``resid_norm``: the mean L2 norm of the residual entering the block over positions ``1 .. T-1``
  (and its standard error over sequences), and ``bos_resid_norm``, the same at position 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from stages_of_inference._tl import Model
from stages_of_inference._utils import check_count, check_model, check_tokens, relative_depth
from stages_of_inference._utils import progress as _progress
from stages_of_inference.batch import Tokens
from stages_of_inference.interventions.hooks import AttentionReadout, ResidualReadout, collect
from stages_of_inference.metrics import mean_and_sem
from stages_of_inference.results import provenance, with_provenance

__all__ = ["SINK_HEAD_THRESHOLD", "sink_profile"]

SINK_HEAD_THRESHOLD = 0.5
"""A head is a sink head of its block when its mean attention to position 0 exceeds this."""


@dataclass
class _Sums:
    """Running per-block statistics over batches of sequences."""

    n_layers: int
    n_heads: int
    n_seq: int
    head_sink: Tensor = field(init=False)  # [layer, head]: summed per-sequence mean attention to position 0
    seq_sink: Tensor = field(init=False)  # [sequence, layer]: mean over heads and queries
    seq_norm: Tensor = field(init=False)  # [sequence, layer]: mean norm over positions 1..T-1
    seq_bos_norm: Tensor = field(init=False)  # [sequence, layer]
    seq_median: Tensor = field(init=False)  # [sequence, layer]: median |x|
    top: list[tuple[float, int, int]] = field(init=False)  # per layer: (max |x|, position, dimension)

    def __post_init__(self) -> None:
        self.head_sink = torch.zeros(self.n_layers, self.n_heads, dtype=torch.float64)
        shape = (self.n_seq, self.n_layers)
        self.seq_sink, self.seq_norm = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
        self.seq_bos_norm, self.seq_median = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
        self.top = [(-1.0, 0, 0)] * self.n_layers

    def attention(self, start: int, layer: int, pattern: Tensor) -> None:
        """Fold one batch's pattern ``[batch, head, query, key]`` of ``layer``."""
        to_first = pattern[:, :, 1:, 0].double().mean(dim=-1).cpu()  # [batch, head], queries 1..T-1
        self.head_sink[layer] += to_first.sum(dim=0)
        self.seq_sink[start : start + pattern.shape[0], layer] = to_first.mean(dim=1)

    def residual(self, start: int, layer: int, resid: Tensor) -> None:
        """Fold one batch's residual ``[batch, pos, d_model]`` entering block ``layer``."""
        rows = slice(start, start + resid.shape[0])
        x = resid.float()
        norms = x.norm(dim=-1).double().cpu()  # [batch, pos]
        self.seq_norm[rows, layer] = norms[:, 1:].mean(dim=1)
        self.seq_bos_norm[rows, layer] = norms[:, 0]
        magnitude = x.abs()
        self.seq_median[rows, layer] = magnitude.flatten(1).median(dim=1).values.double().cpu()
        value, flat = magnitude.flatten().max(dim=0)
        if float(value) > self.top[layer][0]:
            _, pos, dim = np.unravel_index(int(flat), tuple(magnitude.shape))
            self.top[layer] = (float(value), int(pos), int(dim))


def sink_profile(
    model: Model,
    tokens: Tokens,
    *,
    batch_size: int = 8,
    progress: bool = True,
    precision: str = "fp32",
) -> pd.DataFrame:
    """Attention to the first token, massive activations and residual norms before every block.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids, BOS first, at least 2 positions.
        batch_size: sequences per forward pass.
        progress: show a progress bar.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the dtype of the model's products
            (:mod:`stages_of_inference.precision`); the statistics are taken in fp32 or wider.

    Returns:
        One row per block: ``layer``, ``relative_depth`` (``layer / (n_layers - 1)``),
        ``sink_attention``, ``sink_attention_sem``, ``sink_heads_share``, ``max_abs_activation``,
        ``max_position``, ``max_dimension``, ``median_abs_activation``, ``massive_ratio``,
        ``resid_norm``, ``resid_norm_sem``, ``bos_resid_norm`` (module docstring); provenance in
        ``attrs``.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> df = sink_profile(m, torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(0)), progress=False)
        >>> df["layer"].tolist(), bool(((df["sink_attention"] > 0) & (df["sink_attention"] < 1)).all())
        ([0, 1], True)
    """
    model = check_model(model)
    source, tokens = tokens, check_tokens(model, tokens, min_len=2)
    batch_size = check_count(batch_size, "batch_size", "a positive number of sequences")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sums = _Sums(n_layers, n_heads, tokens.shape[0])
    offset = {"start": 0}
    collectors = [AttentionReadout(lambda layer, p: sums.attention(offset["start"], layer, p)),
                  ResidualReadout(lambda point, x: sums.residual(offset["start"], point, x), range(n_layers))]
    for start in _progress(range(0, tokens.shape[0], batch_size), progress, desc="sinks and activations"):
        offset["start"] = start
        collect(model, tokens[start : start + batch_size], collectors, batch_size=batch_size, progress=False,
                precision=precision)
    head_means = sums.head_sink / tokens.shape[0]
    rows = []
    for layer in range(n_layers):
        sink, sink_sem = mean_and_sem(sums.seq_sink[:, layer].unsqueeze(1))
        norm, norm_sem = mean_and_sem(sums.seq_norm[:, layer].unsqueeze(1))
        peak, pos, dim = sums.top[layer]
        median = float(sums.seq_median[:, layer].median())
        rows.append({
            "layer": layer, "relative_depth": relative_depth(layer, n_layers),
            "sink_attention": sink, "sink_attention_sem": sink_sem,
            "sink_heads_share": float((head_means[layer] > SINK_HEAD_THRESHOLD).double().mean()),
            "max_abs_activation": peak, "max_position": pos, "max_dimension": dim,
            "median_abs_activation": median, "massive_ratio": peak / median if median > 0 else float("inf"),
            "resid_norm": norm, "resid_norm_sem": norm_sem,
            "bos_resid_norm": float(sums.seq_bos_norm[:, layer].mean()),
        })
    record = provenance(model, source, analysis="sink_profile", batch_size=batch_size, precision=precision,
                        queries="1..T-1 (attention to position 0)", readout="blocks.{i}.hook_resid_pre",
                        sink_head_threshold=SINK_HEAD_THRESHOLD)
    return with_provenance(pd.DataFrame(rows), record)
