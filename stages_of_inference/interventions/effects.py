"""The layer-effect matrix, measured inside the sweep's trie (after Csordás et al. 2025).

A block's *contribution* is what it adds to the residual stream, ``c_j = resid_post_j -
resid_pre_j`` (``attn_out_j + mlp_out_j``). When a plan leaves the unmodified order (skips block
``i``, swaps two blocks, ...), every later block it runs reads another residual and writes another
contribution. For every whole-block step a plan runs off the unmodified path, :class:`EffectMeter`
measures, per token, ``|| c_j(plan) - c_j || / || c_j ||`` (the relative change of what block ``j``
writes, against what it writes in the unmodified model), and for every block of the unmodified
model its relative size ``|| c_j || / || resid_pre_j ||`` and the cosine between ``c_j`` and
``resid_pre_j``. The sweep computes these contributions anyway: the meter only reads the input and
output of each block call, so the matrix costs a few element-wise passes, not a forward per pair.

Tokens are the sweep's scored positions (``1 .. T-2``, or the last ``score_last`` of them; the KL
of the same plan is averaged over the same tokens); the sums are float64 per sequence, so batches
and shards add up exactly. A step that runs one sublayer is not measured (its contribution is not
comparable with the whole block's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from stages_of_inference.interventions import trie as trie_
from stages_of_inference.interventions.plan import Step

__all__ = ["EFFECT_KEYS", "EffectMeter", "aggregate_effects"]

EFFECT_KEYS = ("change", "size", "cosine")
"""The per-token quantities summed per sequence: relative change of the contribution against the
unmodified model's, the contribution's size relative to the residual it reads, and their cosine."""

_TINY = 1e-12


def _per_token(c: Tensor, x: Tensor, c_ref: Tensor) -> Tensor:
    """``[3, batch]`` float64 sums over positions of (relative change, relative size, cosine)."""
    c, x, c_ref = c.float(), x.float(), c_ref.float()
    ref_norm = c_ref.norm(dim=-1)
    change = (c - c_ref).norm(dim=-1) / ref_norm.clamp_min(_TINY)
    c_norm, x_norm = c.norm(dim=-1), x.norm(dim=-1)
    size = c_norm / x_norm.clamp_min(_TINY)
    cosine = (c * x).sum(dim=-1) / (c_norm * x_norm).clamp_min(_TINY)
    return torch.stack([change, size, cosine]).double().sum(dim=-1)


@dataclass
class EffectMeter:
    """Per trie node, float64 sums per sequence of :data:`EFFECT_KEYS` for the block it ran.

    Attributes:
        trunk: the unmodified model's residuals, ``trunk[j]`` before block ``j`` (``[batch, pos, d_model]``).
        scored: the positions measured (the sweep's scored positions).
        nodes: node index -> (block, ``[3, batch]`` sums) for every whole-block node measured.
    """

    trunk: Sequence[Tensor]
    scored: slice = field(default_factory=lambda: slice(1, -1))
    nodes: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)

    def contribution(self, layer: int) -> Tensor:
        """Block ``layer``'s unmodified contribution on the scored positions (computed when asked:
        kept for every block it would cost as much memory as the trunk).
        """
        return self.trunk[layer + 1][:, self.scored] - self.trunk[layer][:, self.scored]

    def reference(self, layer: int) -> np.ndarray:
        """The unmodified model's ``[3, batch]`` sums for block ``layer`` (relative change 0)."""
        c = self.contribution(layer)
        return _per_token(c, self.trunk[layer][:, self.scored], c).cpu().numpy()

    def record(self, index: int, step: Step, x_in: Tensor, x_out: Tensor) -> None:
        """Measure node ``index``, which ran ``step`` on ``x_in`` and gave ``x_out``."""
        if not isinstance(step, int):
            return
        x = x_in[:, self.scored]
        self.nodes[index] = (step, _per_token(x_out[:, self.scored] - x, x, self.contribution(step)).cpu().numpy())

    def rows(self, lay: trie_.Layout, leaf: trie_.Node, first_sequence: int, n_tokens: int) -> pd.DataFrame:
        """The sums of the plans ending at ``leaf``: every measured node on its path off the
        unmodified order (none for a plan that never leaves it).
        """
        path: list[tuple[int, int, np.ndarray]] = []  # (step, block, sums), from the leaf up
        node: trie_.Node | None = leaf
        while node is not None and node.index not in lay.trunk:
            if node.index in self.nodes:
                block, sums = self.nodes[node.index]
                path.append((lay.depth[node.index] - 1, block, sums))
            node = lay.parent[node.index]
        return _frame([(pid, *entry) for pid in leaf.ends for entry in reversed(path)], first_sequence, n_tokens)

    def reference_rows(self, first_sequence: int, n_tokens: int) -> pd.DataFrame:
        """The unmodified model's sums, block by block (``plan_id`` -1; its relative change is 0)."""
        n_layers = len(self.trunk) - 1
        return _frame([(-1, j, j, self.reference(j)) for j in range(n_layers)], first_sequence, n_tokens)


def _frame(entries: Sequence[tuple[int, int, int, np.ndarray]], first_sequence: int, n_tokens: int) -> pd.DataFrame:
    """One row per (plan, step, block, sequence) from ``(plan_id, step, block, [3, batch] sums)`` entries."""
    if not entries:
        return _empty()
    frames = []
    for pid, step, block, sums in entries:
        n_seq = sums.shape[1]
        frames.append(pd.DataFrame({
            "plan_id": np.full(n_seq, pid, dtype=np.int64),
            "sequence": np.arange(first_sequence, first_sequence + n_seq, dtype=np.int64),
            "step": np.full(n_seq, step, dtype=np.int64), "block": np.full(n_seq, block, dtype=np.int64),
            "n_tokens": np.full(n_seq, n_tokens, dtype=np.int64),
            **{f"{key}_sum": sums[k] for k, key in enumerate(EFFECT_KEYS)},
        }))
    return pd.concat(frames, ignore_index=True)


def _empty() -> pd.DataFrame:
    columns = {"plan_id": "int64", "sequence": "int64", "step": "int64", "block": "int64", "n_tokens": "int64",
               **{f"{key}_sum": "float64" for key in EFFECT_KEYS}}
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})


def aggregate_effects(per_sequence: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Pool the per-sequence sums of every batch: one row per (plan, step, block) with the means
    over tokens (``relative_change``, ``relative_size``, ``cosine``) and the standard error over
    sequences of the relative change (``relative_change_sem``; 0 for one sequence).

    Example:
        >>> sums = pd.DataFrame({"plan_id": [0, 0], "sequence": [0, 1], "step": [1, 1], "block": [2, 2],
        ...                      "n_tokens": [2, 2], "change_sum": [1.0, 3.0], "size_sum": [0.2, 0.2],
        ...                      "cosine_sum": [0.0, 1.0]})
        >>> aggregate_effects([sums])[["relative_change", "relative_change_sem", "cosine"]].values.tolist()
        [[1.0, 0.5, 0.25]]
    """
    table = pd.concat(list(per_sequence), ignore_index=True)
    keys = ["plan_id", "step", "block"]
    total = table.groupby(keys, sort=True).sum(numeric_only=True)
    n = total["n_tokens"].astype(np.float64)
    out = pd.DataFrame({"relative_change": total["change_sum"] / n, "relative_size": total["size_sum"] / n,
                        "cosine": total["cosine_sum"] / n})
    seq_mean = table["change_sum"] / table["n_tokens"].astype(np.float64)
    grouped = seq_mean.groupby([table[k] for k in keys], sort=True)
    count = grouped.size()
    sem = (grouped.std(ddof=1) / np.sqrt(count)).where(count > 1, 0.0)
    out["relative_change_sem"] = sem.reindex(out.index).to_numpy()
    return out.reset_index()[[*keys, "relative_change", "relative_change_sem", "relative_size", "cosine"]]
