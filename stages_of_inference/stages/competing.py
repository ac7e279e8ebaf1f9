"""Competing readings of depth, measured beside the four stages (beyond the paper).

Other work reads a model's depth with other signals. This module measures them on the same
tokens, from one forward pass with no cache kept, so a report can put them beside the stage bands:

* **Mix-Compress-Refine** (Queipo-de-Llano et al. 2025, arXiv:2510.06477) reads three phases off
  the first token's residual norm (it grows by orders of magnitude early, when massive
  activations switch on) and the *matrix-based entropy* of the token representations, which
  falls into a "compression valley" while the first token dominates and rises again late.
  :func:`depth_proxies` gives, at every readout, ``bos_norm`` (the first token's L2 norm) and
  ``matrix_entropy``: for each sequence, with ``Z`` its ``[T, d_model]`` residual (every position,
  the first included), ``K = Z Z^T``, ``lambda`` the eigenvalues of ``K / trace(K)``, the Renyi
  entropy ``log(sum lambda^alpha) / (1 - alpha)`` (``-sum lambda log lambda`` at
  ``alpha = 1``, the default) divided by ``log T`` (so 1 is all directions used equally, 0 is one
  direction), averaged over sequences. :func:`phase_boundaries` reads the phases' boundaries.
* **Cheap proxies of a block's importance** used to prune layers: *block influence* (ShortGPT,
  Men et al. 2024, arXiv:2403.03853), ``1 - cos(x_in, x_out)`` averaged over every token;
  *angular distance* (Gromov et al. 2024, arXiv:2403.17887), ``arccos(cos(x_in, x_out)) / pi`` on
  the last token of each sequence, averaged over sequences; and the *relative update*
  ``||x_out - x_in|| / ||x_in||`` averaged over positions after the first. ``x_in`` and ``x_out``
  are the residual stream entering and leaving the block. :func:`proxy_agreement` ranks them
  against the damage measured by deleting each block (Spearman's rank correlation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from stages_of_inference._tl import Model
from stages_of_inference._utils import check_count, check_model, check_tokens, relative_depth
from stages_of_inference._utils import progress as _progress
from stages_of_inference.batch import Tokens
from stages_of_inference.interventions.hooks import ResidualReadout, collect
from stages_of_inference.metrics import mean_and_sem
from stages_of_inference.results import provenance, with_provenance

__all__ = ["PROXIES", "TRUSTED", "depth_proxies", "matrix_entropy", "phase_boundaries", "phase_starts", "proxy_agreement",
           "spearman"]

PROXIES = ("block_influence", "angular_distance", "relative_update")
"""The cheap proxies of a block's importance :func:`depth_proxies` measures (module docstring)."""

TRUSTED = 0.5
"""A proxy ranks the blocks like deletion damage when the low end of its rank correlation's 90 %
interval is above this (:func:`proxy_agreement`)."""


def matrix_entropy(z: Tensor, alpha: float = 1.0) -> Tensor:
    """The normalised matrix-based entropy of each sequence's token representations.

    Args:
        z: ``[batch, T, d]`` representations (every position of each sequence).
        alpha: the Renyi order (positive; 1 is the Shannon limit).

    Returns:
        ``[batch]`` float64 entropies in ``[0, 1]`` (divided by ``log T``).

    Example:
        >>> z = torch.tensor([[[1., 0.], [0., 1.]], [[1., 0.], [2., 0.]]])
        >>> [round(v, 6) for v in matrix_entropy(z).tolist()]
        [1.0, 0.0]
    """
    x = z.double()
    gram = x @ x.transpose(-1, -2)
    lam = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    lam = lam / lam.sum(dim=-1, keepdim=True)
    if alpha == 1.0:
        h = -(torch.where(lam > 0, lam * lam.log(), torch.zeros_like(lam))).sum(dim=-1)
    else:
        h = (lam.pow(alpha).sum(dim=-1)).log() / (1.0 - alpha)
    return h / math.log(z.shape[-2]) + 0.0  # no -0.0


@dataclass
class _Sums:
    """Per-sequence statistics at every readout and block."""

    n_layers: int
    n_seq: int
    alpha: float
    bos: Tensor = field(init=False)  # [sequence, readout]
    entropy: Tensor = field(init=False)  # [sequence, readout]
    influence: Tensor = field(init=False)  # [sequence, block]: mean over positions of 1 - cos
    angle: Tensor = field(init=False)  # [sequence, block]: last position
    update: Tensor = field(init=False)  # [sequence, block]: mean over positions 1..T-1
    previous: Tensor | None = None

    def __post_init__(self) -> None:
        readouts, blocks = (self.n_seq, self.n_layers + 1), (self.n_seq, self.n_layers)
        self.bos, self.entropy = torch.zeros(readouts, dtype=torch.float64), torch.zeros(readouts, dtype=torch.float64)
        self.influence, self.angle = torch.zeros(blocks, dtype=torch.float64), torch.zeros(blocks, dtype=torch.float64)
        self.update = torch.zeros(blocks, dtype=torch.float64)

    def readout(self, start: int, point: int, resid: Tensor) -> None:
        """Fold readout ``point`` (``[batch, pos, d_model]``, the residual entering block ``point``)."""
        x = resid.double().cpu()
        rows = slice(start, start + x.shape[0])
        self.bos[rows, point] = x[:, 0].norm(dim=-1)
        self.entropy[rows, point] = matrix_entropy(x, self.alpha)
        if point > 0 and self.previous is not None:
            before = self.previous
            cos = torch.nn.functional.cosine_similarity(before, x, dim=-1)  # [batch, pos]
            self.influence[rows, point - 1] = (1.0 - cos).mean(dim=1)
            self.angle[rows, point - 1] = torch.arccos(cos[:, -1].clamp(-1.0, 1.0)) / math.pi
            change = (x - before).norm(dim=-1)[:, 1:] / before.norm(dim=-1)[:, 1:]
            self.update[rows, point - 1] = change.mean(dim=1)
        self.previous = x if point < self.n_layers else None


def depth_proxies(
    model: Model,
    tokens: Tokens,
    *,
    alpha: float = 1.0,
    batch_size: int = 8,
    progress: bool = True,
    precision: str = "fp32",
) -> dict[str, pd.DataFrame]:
    """The Mix-Compress-Refine signals at every readout and the pruning proxies of every block.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids, BOS first, at least 2 positions.
        alpha: the Renyi order of the matrix-based entropy (positive).
        batch_size: sequences per forward pass.
        progress: show a progress bar.
        precision: the dtype of the model's products (:mod:`stages_of_inference.precision`); the
            statistics are taken in float64.

    Returns:
        ``{"readouts": ..., "blocks": ..., "per_sequence": ...}``. ``readouts``: one row per readout ``0 .. n_layers``
        (the residual entering block ``readout``; the last is the last block's output, before
        the final norm): ``readout``, ``relative_depth`` (``readout / n_layers``), ``bos_norm``,
        ``matrix_entropy`` and its ``_sem`` over sequences. ``blocks``: one row per block:
        ``layer``, ``relative_depth`` (``layer / (n_layers - 1)``), each of :data:`PROXIES` and
        its ``_sem``. ``per_sequence``: per ``sequence`` and ``readout``, that sequence's
        ``bos_norm`` and ``matrix_entropy`` (what a bootstrap over sequences resamples).
        Provenance in ``attrs``.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu"))
        >>> out = depth_proxies(m, torch.randint(0, 5, (3, 6), generator=torch.Generator().manual_seed(0)), progress=False)
        >>> out["readouts"]["readout"].tolist(), out["blocks"]["layer"].tolist()
        ([0, 1, 2], [0, 1])
    """
    model = check_model(model)
    source, tokens = tokens, check_tokens(model, tokens, min_len=2)
    batch_size = check_count(batch_size, "batch_size", "a positive number of sequences")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha (the entropy's Renyi order) must be a positive number, got {alpha!r}")
    n = model.cfg.n_layers
    sums = _Sums(n, tokens.shape[0], float(alpha))
    offset = {"start": 0}
    readout = ResidualReadout(lambda point, x: sums.readout(offset["start"], point, x), range(n + 1))
    for start in _progress(range(0, tokens.shape[0], batch_size), progress, desc="competing readings"):
        offset["start"] = start
        collect(model, tokens[start : start + batch_size], [readout], batch_size=batch_size, progress=False,
                precision=precision)
    record = provenance(model, source, analysis="depth_proxies", alpha=float(alpha), batch_size=batch_size,
                        precision=precision, entropy="Renyi matrix entropy of Z Z^T / trace, every position, / log T",
                        block_influence="1 - cos(x_in, x_out), every position (Men et al. 2024)",
                        angular_distance="arccos(cos(x_in, x_out)) / pi, last position (Gromov et al. 2024)",
                        relative_update="||x_out - x_in|| / ||x_in||, positions 1..T-1")
    readouts = pd.DataFrame({"readout": range(n + 1), "relative_depth": [i / n for i in range(n + 1)],
                             "bos_norm": sums.bos.mean(dim=0).numpy()})
    readouts["matrix_entropy"], readouts["matrix_entropy_sem"] = zip(*(mean_and_sem(sums.entropy[:, [i]])
                                                                      for i in range(n + 1)))
    blocks = pd.DataFrame({"layer": range(n), "relative_depth": [relative_depth(i, n) for i in range(n)]})
    for name, values in zip(PROXIES, (sums.influence, sums.angle, sums.update)):
        blocks[name], blocks[f"{name}_sem"] = zip(*(mean_and_sem(values[:, [i]]) for i in range(n)))
    n_seq = tokens.shape[0]
    per = pd.DataFrame({"sequence": np.repeat(np.arange(n_seq), n + 1), "readout": np.tile(np.arange(n + 1), n_seq),
                        "bos_norm": sums.bos.reshape(-1).numpy(), "matrix_entropy": sums.entropy.reshape(-1).numpy()})
    return {"readouts": with_provenance(readouts, record), "blocks": with_provenance(blocks, record),
            "per_sequence": with_provenance(per, dict(record))}


def spearman(x: np.ndarray, y: np.ndarray, level: float = 0.9) -> tuple[float, float, float]:
    """Spearman's rank correlation of ``x`` and ``y`` (ties get their mean rank) and its ``level``
    interval from Fisher's z with the standard error ``sqrt(1.06 / (n - 3))`` (Fieller, Hartley and
    Pearson 1957); the interval is NaN below 4 pairs.

    Example:
        >>> rho, low, high = spearman(np.arange(10.), np.arange(10.) ** 2)
        >>> [round(v, 6) for v in (rho, low, high)]
        [1.0, 1.0, 1.0]
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if len(x) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan"), float("nan"), float("nan")
    rho = float(np.corrcoef(rx, ry)[0, 1])
    if len(x) < 4:
        return rho, float("nan"), float("nan")
    z = math.atanh(min(max(rho, -1 + 1e-12), 1 - 1e-12))
    half = _normal_quantile(0.5 + level / 2) * math.sqrt(1.06 / (len(x) - 3))
    return rho, math.tanh(z - half), math.tanh(z + half)


def _normal_quantile(p: float) -> float:
    """The standard normal quantile (bisection on ``erf``; no scipy)."""
    low, high = -10.0, 10.0
    for _ in range(100):
        mid = (low + high) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def proxy_agreement(blocks: pd.DataFrame, sweep_summary: pd.DataFrame, level: float = 0.9) -> pd.DataFrame:
    """How well each cheap proxy ranks the blocks like the measured damage of deleting them.

    Args:
        blocks: :func:`depth_proxies`' ``blocks`` table.
        sweep_summary: a robustness sweep summary with the single-block deletions (``kind == "drop"``).
        level: the interval's coverage.

    Returns:
        One row per proxy of :data:`PROXIES`: ``proxy``, ``spearman`` (with the deletion KL over
        blocks), ``low``, ``high`` (its ``level`` interval), ``n_blocks``, ``trusted`` (``low >
        TRUSTED``).

    Example:
        >>> blocks = pd.DataFrame({"layer": range(6), "block_influence": [.9, .1, .2, .3, .4, .8],
        ...                        "angular_distance": [.5] * 6, "relative_update": [6, 5, 4, 3, 2, 1]})
        >>> sweep = pd.DataFrame({"kind": ["drop"] * 6, "layer": range(6), "kl_nats": [5, .1, .2, .3, .4, 2]})
        >>> proxy_agreement(blocks, sweep).round(3)[["proxy", "spearman", "trusted"]].values.tolist()
        [['block_influence', 1.0, True], ['angular_distance', nan, False], ['relative_update', -0.143, False]]
    """
    drops = sweep_summary[sweep_summary["kind"] == "drop"]
    kl = pd.Series(drops["kl_nats"].to_numpy(float), index=drops["layer"].astype(int).to_numpy())
    table = blocks.set_index("layer").reindex(kl.index)
    rows = []
    for name in PROXIES:
        rho, low, high = spearman(table[name].to_numpy(float), kl.to_numpy(), level)
        rows.append({"proxy": name, "spearman": rho, "low": low, "high": high, "n_blocks": len(kl),
                     "trusted": bool(low > TRUSTED)})
    return pd.DataFrame(rows)


def phase_starts(bos_norm: np.ndarray, entropy: np.ndarray) -> tuple[int, int]:
    """The readouts at which compression and refinement begin (:func:`phase_boundaries`), from the
    first token's norm and the matrix entropy at readouts ``0 .. n`` in order; -1 where a phase
    never begins.

    Example:
        >>> phase_starts(np.array([1, 2, 90, 95, 60, 30.]), np.array([.9, .8, .2, .1, .35, .5]))
        (2, 4)
    """
    rise = np.diff(np.log(np.maximum(bos_norm, 1e-30)))
    compress = int(np.argmax(rise)) + 1 if len(rise) else -1
    valley = int(np.argmin(entropy))
    target = entropy[valley] + 0.5 * (entropy[-1] - entropy[valley])
    later = np.nonzero(entropy[valley + 1:] >= target)[0] if entropy[-1] > entropy[valley] else []
    return compress, (valley + 1 + int(later[0])) if len(later) else -1


def phase_boundaries(readouts: pd.DataFrame) -> pd.DataFrame:
    """The boundaries of Mix-Compress-Refine's phases, read off :func:`depth_proxies`' readouts.

    * *compression begins* at the block entered right after the largest rise of the first
      token's norm (the block that writes the massive activation is the last of the mixing phase);
    * *refinement begins* at the first readout after the entropy's minimum (the valley) where the
      entropy has recovered half of the way from the minimum to its value at the last readout
      (-1 where it never does).

    Returns:
        ``phase``, ``readout`` (the block it begins at), ``relative_depth`` (``readout / n_layers``).

    Example:
        >>> r = pd.DataFrame({"readout": range(6), "bos_norm": [1, 2, 90, 95, 60, 30],
        ...                   "matrix_entropy": [.9, .8, .2, .1, .35, .5]})
        >>> phase_boundaries(r)[["phase", "readout"]].values.tolist()
        [['compression', 2], ['refinement', 4]]
    """
    r = readouts.sort_values("readout")
    n = int(r["readout"].max())
    compress, refine = phase_starts(r["bos_norm"].to_numpy(float), r["matrix_entropy"].to_numpy(float))
    return pd.DataFrame({"phase": ["compression", "refinement"], "readout": [compress, refine],
                         "relative_depth": [b / n if b >= 0 and n else float("nan") for b in (compress, refine)]})
