"""The tuned lens (Belrose et al. 2023, arXiv 2303.08112): one affine translator per readout,
trained so that the translated readout, read through the final norm and the unembedding, gives the
model's final distribution.

Readout ``k < n_layers`` (``k = 0`` is the embeddings) is translated as ``h + h @ weight[k] +
bias[k]`` (the residual form: ``weight`` and ``bias`` start at zero, so an untrained lens is the
identity) and then read like the ``"per_layer_norm"`` logit lens: the final norm with the
translated vector's own statistics, then ``W_U`` without ``b_U``. The last readout (the output) has
no translator, so it is the model's own output distribution.

Training (:func:`train_tuned_lens`) minimises, summed over the readouts, the mean over token
positions of ``KL(final || translated readout)``, the loss of Belrose et al.: the model is frozen
and its readouts are computed once, so each step costs one unembedding and its backward pass per
readout. The optimiser is Adam (the authors use SGD with Nesterov momentum over many more tokens;
Adam reaches a useful lens within the few dozen steps a CPU affords: docs/tuned-lens.md).
Positions are drawn by a seeded generator, so a seed, the tokens and the settings give the same
translators on the same machine.

A trained lens is a :class:`TunedLens`: pass it wherever a lens convention is accepted
(``convention=lens``); tables then say ``"tuned"`` and their provenance names the lens's key.
Lenses are saved as safetensors with their provenance (:func:`save_tuned_lens`,
:func:`load_tuned_lens`; never a pickle) and cached by content: the key digests the model's
weights, the training tokens and the settings, and :func:`train_tuned_lens` reuses a cached lens
whose key matches instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from stages_of_inference._tl import Model
from stages_of_inference._utils import atomic_write_bytes, check_model, check_tokens
from stages_of_inference._utils import progress as _progress
from stages_of_inference.backends import as_seam
from stages_of_inference.batch import Tokens, describe_any
from stages_of_inference.lens import apply_lens_norm, collect_readouts, unembed
from stages_of_inference.metrics import scored_positions
from stages_of_inference.models import cache_dir
from stages_of_inference.precision import check_precision
from stages_of_inference.results import config_hash, model_name, weights_hash

__all__ = ["DEFAULT_STEPS", "FORMAT", "KINDS", "TunedLens", "TuningSettings", "cached_lens", "cached_lens_path", "lens_key",
           "load_tuned_lens", "model_record", "save_tuned_lens", "train_tuned_lens"]

KINDS = ("tuned", "jacobian")
"""The kinds of translated lens: trained on the KL (``"tuned"``) or the Jacobian lens."""
DEFAULT_STEPS = 24
"""Optimiser steps of a default training (:class:`TuningSettings`)."""
FORMAT = "stages_of_inference tuned lens 1"
"""The format written into every saved lens's metadata (a file of another format is refused)."""


@dataclass(frozen=True)
class TuningSettings:
    """How a tuned lens is trained (all of it is part of the lens's key).

    Attributes:
        steps: optimiser steps.
        tokens_per_step: token positions per step, drawn without replacement from the training
            positions (all of them when there are fewer).
        lr: Adam's learning rate.
        seed: seeds the draw of positions.
        precision: the dtype of the model's products when the readouts are collected
            (:mod:`stages_of_inference.precision`); training itself is fp32.

    Example:
        >>> TuningSettings(steps=10).steps
        10
        >>> TuningSettings(steps=0)
        Traceback (most recent call last):
        ...
        ValueError: steps must be a positive whole number of optimiser steps, got 0
    """

    steps: int = DEFAULT_STEPS
    tokens_per_step: int = 96
    lr: float = 4e-2
    seed: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for name, what in (("steps", "optimiser steps"), ("tokens_per_step", "token positions")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number of {what}, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < float("inf"):
            raise ValueError(f"lr must be a positive finite learning rate, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be a whole number, got {self.seed!r}")
        check_precision(self.precision)


@dataclass(frozen=True, eq=False)
class TunedLens:
    """Trained translators of one model's readouts (pass it as ``convention=``).

    Attributes:
        weight: ``[n_layers, d_model, d_model]``; readout ``k`` becomes ``h + h @ weight[k] + bias[k]``.
        bias: ``[n_layers, d_model]``.
        provenance: how it was made: ``key``, ``model`` (name, config and weights hashes),
            ``tokens`` (the training tokens' record), ``settings``, ``train_kl_nats`` (the last
            step's KL per readout).
        kind: ``"tuned"`` (trained on the KL) or ``"jacobian"`` (the Jacobian lens,
            :mod:`stages_of_inference.jacobian_lens`: ``weight = J^T - I``, no bias); what a
            table's ``convention`` column says.
    """

    weight: Float[Tensor, "layer d_model d_model"]
    bias: Float[Tensor, "layer d_model"]
    provenance: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "tuned"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {self.kind!r}")
        w, b = self.weight, self.bias
        if not (isinstance(w, Tensor) and isinstance(b, Tensor)) or w.ndim != 3 or b.ndim != 2 \
                or w.shape[1] != w.shape[2] or tuple(b.shape) != tuple(w.shape[:2]):
            raise ValueError("a tuned lens holds weight [n_layers, d_model, d_model] and bias [n_layers, d_model]; got "
                             f"{tuple(getattr(w, 'shape', ()))} and {tuple(getattr(b, 'shape', ()))}")

    @property
    def key(self) -> str:
        """The lens's content key (empty for a lens built by hand)."""
        return str(self.provenance.get("key", ""))

    def check(self, model: Model) -> None:
        """Refuse a model this lens was not made for: another width or depth, or, where the lens
        records them, another model name or vocabulary. (The name, not the weights, is compared, so
        that a lens made on one backend reads the same checkpoint on the other; the cache key is
        on the weights.)
        """
        n, d = model.cfg.n_layers, model.cfg.d_model
        if tuple(self.weight.shape) != (n, d, d):
            raise ValueError(f"this {self.kind} lens has translators for {self.weight.shape[0]} readouts of width "
                             f"{self.weight.shape[1]}; the model has {n} blocks of width {d}")
        recorded = self.provenance.get("model", {})
        for field_name, mine in (("name", model_name(model)), ("d_vocab", int(model.cfg.d_vocab))):
            if field_name in recorded and recorded[field_name] != mine:
                raise ValueError(f"this {self.kind} lens was made for another model ({field_name} "
                                 f"{recorded[field_name]!r}); this model's is {mine!r}")

    def translate(self, k: int, readout: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_model"]:
        """Readout ``k`` translated (out of place, differentiable); the output readout is unchanged."""
        if k >= self.weight.shape[0] or k < 0:
            return readout
        w = self.weight[k].to(readout.device, torch.float32)
        return readout + readout @ w + self.bias[k].to(readout.device, torch.float32)

    def translate_(self, k: int, readout: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_model"]:
        """:meth:`translate` in place (inference only)."""
        if 0 <= k < self.weight.shape[0]:
            w = self.weight[k].to(readout.device, torch.float32)
            readout.add_(readout @ w).add_(self.bias[k].to(readout.device, torch.float32))
        return readout

    def describe(self) -> dict[str, Any]:
        """What a table's provenance records of the lens."""
        return {"name": self.kind, "key": self.key, "settings": self.provenance.get("settings"),
                "tokens": self.provenance.get("tokens")}


def lens_key(model: Model, tokens: Tokens, settings: Any) -> str:
    """The content key of the lens made on ``model`` (its weights), ``tokens`` and ``settings``
    (a dataclass or a dict of them).
    """
    settings = asdict(settings) if not isinstance(settings, dict) else settings
    record = {"format": FORMAT, "config": config_hash(model), "weights": weights_hash(model),
              "tokens": describe_any(tokens)["sha256"], "settings": settings}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def cached_lens_path(key: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """Where the lens of ``key`` is cached: ``cache``, else the library's cache folder's
    ``tuned_lens`` (:func:`stages_of_inference.models.cache_dir`).
    """
    if cache is None:
        cache = cache_dir() / "tuned_lens"
    return Path(cache) / f"{key}.safetensors"


def save_tuned_lens(lens: TunedLens, path: str | os.PathLike[str]) -> Path:
    """Write ``lens`` to ``path`` as safetensors, its provenance in the metadata, atomically."""
    metadata = {"format": FORMAT, "kind": lens.kind, "provenance": json.dumps(dict(lens.provenance), sort_keys=True)}
    data = st_save({"weight": lens.weight.detach().float().cpu().contiguous(),
                    "bias": lens.bias.detach().float().cpu().contiguous()}, metadata=metadata)
    return atomic_write_bytes(path, data)


def load_tuned_lens(path: str | os.PathLike[str], model: Model | None = None) -> TunedLens:
    """Read a lens written by :func:`save_tuned_lens` (checked against ``model`` when given).

    Raises:
        ValueError: the file is not a tuned lens of this library's format, is damaged, or (with
            ``model``) was trained for another model.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        metadata = _metadata(data)
    except (OSError, SafetensorError, ValueError) as error:
        raise ValueError(f"{path} is not a readable tuned lens ({error})") from None
    if metadata.get("format") != FORMAT or set(tensors) != {"weight", "bias"}:
        raise ValueError(f"{path} is not a tuned lens of this library (format {metadata.get('format')!r}, "
                         f"tensors {sorted(tensors)}); expected format {FORMAT!r} with weight and bias")
    try:
        record = json.loads(metadata.get("provenance", "{}"))
    except json.JSONDecodeError:
        raise ValueError(f"{path}: the provenance in its metadata is not JSON") from None
    if metadata.get("kind", "tuned") not in KINDS:
        raise ValueError(f"{path}: unknown lens kind {metadata.get('kind')!r}; expected one of {', '.join(KINDS)}")
    lens = TunedLens(tensors["weight"], tensors["bias"], record, kind=metadata.get("kind", "tuned"))
    if model is not None:
        lens.check(model)
    return lens


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (the header is 8 bytes of length, then JSON)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    return dict(header.get("__metadata__", {}))


def train_tuned_lens(
    model: Model,
    tokens: Tokens,
    settings: TuningSettings | None = None,
    *,
    cache: bool | str | os.PathLike[str] = True,
    batch_size: int = 8,
    progress: bool = True,
) -> TunedLens:
    """Train a tuned lens on ``tokens`` (or reuse the cached one of the same key).

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` (left unchanged).
        tokens: ``[batch, pos]`` training tokens, BOS first; never the tokens the lens will be
            judged on (the study trains on windows its own batch does not hold).
        settings: :class:`TuningSettings` (defaults: 24 steps of 96 positions, Adam at 4e-2).
        cache: ``True``: reuse or store the lens in the library's cache folder; a folder: there;
            ``False``: train and store nothing.
        batch_size: sequences per forward pass while the readouts are collected.
        progress: show a progress bar over the steps.

    Returns:
        The :class:`TunedLens`; its provenance holds its key and the last step's KL per readout.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=16, d_head=4, d_vocab=11, act_fn="relu", normalization_type="LN"))
        >>> lens = train_tuned_lens(m, torch.randint(0, 11, (4, 12)), TuningSettings(steps=3), cache=False, progress=False)
        >>> lens.weight.shape, len(lens.provenance["train_kl_nats"])
        (torch.Size([2, 8, 8]), 2)
    """
    model = check_model(model)
    tokens_t = check_tokens(model, tokens, min_len=3)
    settings = settings if settings is not None else TuningSettings()
    if not isinstance(settings, TuningSettings):
        raise TypeError(f"settings must be a TuningSettings, got {type(settings).__name__}")
    key = lens_key(model, tokens, settings)

    def train() -> TunedLens:
        readouts = _training_readouts(model, tokens_t, settings.precision, batch_size)
        weight, bias, last = _fit(model, readouts, settings, progress)
        record = {"key": key, "format": FORMAT, "model": model_record(model), "tokens": describe_any(tokens),
                  "settings": asdict(settings), "train_kl_nats": last,
                  "loss": "mean over positions of KL(final || translated readout), summed over readouts"}
        return TunedLens(weight, bias, record)
    return cached_lens(model, key, cache, train)


def model_record(model: Model) -> dict[str, Any]:
    """What a lens records of the model it was made on (its name, shapes and hashes)."""
    return {"name": model_name(model), "config_hash": config_hash(model), "weights_hash": weights_hash(model),
            "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model, "d_vocab": model.cfg.d_vocab}


def cached_lens(model: Model, key: str, cache: bool | str | os.PathLike[str], make: Any) -> TunedLens:
    """The lens of ``key`` from the cache (``cache``: ``True`` for the library's folder, a folder,
    or ``False`` for none), else ``make()``'s, stored there. A damaged or foreign file of that key
    is made again and replaced.
    """
    path = None if cache is False else cached_lens_path(key, None if cache is True else cache)
    if path is not None and path.is_file():
        try:
            found = load_tuned_lens(path, model)
            if found.key == key:
                return found
        except ValueError:
            pass  # damaged or foreign: made again and overwritten below
    lens = make()
    if path is not None:
        save_tuned_lens(lens, path)
    return lens


def _training_readouts(model: Model, tokens: Tensor, precision: str, batch_size: int) -> Tensor:
    """Every readout at every scored position: ``[n_layers + 1, rows, d_model]`` (fp32)."""
    keep = scored_positions(tokens.shape[1])
    points = list(range(model.cfg.n_layers + 1))
    parts = []
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            buf, _ = collect_readouts(model, tokens[start : start + batch_size], keep, points, precision)
            parts.append(buf.flatten(1, 2).clone())
    return torch.cat(parts, dim=1)


def _fit(model: Model, readouts: Tensor, settings: TuningSettings,
         progress: bool) -> tuple[Tensor, Tensor, list[float]]:
    """Adam on the summed KL; each readout's backward pass runs alone (its graph is freed at once).

    The weight's learning rate is ``lr / sqrt(d_model)`` (a step moves ``h @ weight`` by about as
    much as it moves ``bias``, relative to the readout).
    """
    n, rows, d = readouts.shape[0] - 1, readouts.shape[1], readouts.shape[2]
    weight = torch.zeros(n, d, d, device=readouts.device, requires_grad=True)
    bias = torch.zeros(n, d, device=readouts.device, requires_grad=True)
    optimiser = torch.optim.Adam([{"params": [weight], "lr": settings.lr / d**0.5}, {"params": [bias]}],
                                 lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    take = min(settings.tokens_per_step, rows)
    kl = _KLToFinal(model)
    last = [float("nan")] * n
    for _ in _progress(range(settings.steps), progress, desc="tuned lens"):
        chosen = torch.randperm(rows, generator=generator)[:take].to(readouts.device)
        target = kl.target(readouts[n, chosen])
        optimiser.zero_grad(set_to_none=False)
        for k in range(n):
            h = readouts[k, chosen]
            loss = kl(h + h @ weight[k] + bias[k], target)
            loss.backward()
            last[k] = float(loss.detach())
        optimiser.step()
    return weight.detach(), bias.detach(), last


@dataclass(frozen=True)
class _Target:
    """The final distribution of a step's positions: log-probabilities, and what the loss needs."""

    logp: Tensor  # [rows, d_vocab]
    neg_entropy: Tensor  # [rows]: sum_v p log p
    pulled: Tensor | None  # [rows, d_model]: p @ W_U^T times the logit scale (linear lenses only)


class _KLToFinal:
    """Mean over rows of KL(final || lens of a translated readout), the tuned lens's loss.

    Without a logit soft-cap the lens logits are ``s * norm(z) @ W_U``, so ``sum_v p_v logit_v`` is
    ``norm(z) . (s * W_U p)`` and the loss is ``sum p log p - norm(z) . pulled + logsumexp(logits)``:
    the only pass over the vocabulary is the log-sum-exp (:class:`_LogSumExp`, whose backward is
    ``softmax @ W_U^T``). With a soft-cap the loss is taken literally from the log-softmax.
    """

    def __init__(self, model: Model) -> None:
        self.model, self.norm, self.unembed = model, apply_lens_norm, unembed
        seam = as_seam(model)
        self.w_u = seam.W_U.detach().float()
        self.scale = float(seam.logit_scale)
        cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
        self.linear = cap <= 0

    def target(self, final_readout: Tensor) -> _Target:
        with torch.no_grad():
            logp = torch.log_softmax(self.unembed(self.model, self.norm(self.model, final_readout, "per_layer_norm")), -1)
            p = logp.exp()
            pulled = (p @ self.w_u.T) * self.scale if self.linear else None
            return _Target(logp, (p * logp).sum(-1), pulled)

    def __call__(self, z: Tensor, target: _Target) -> Tensor:
        normed = self.norm(self.model, z, "per_layer_norm")
        if not self.linear:
            logq = torch.log_softmax(self.unembed(self.model, normed), -1)
            return (target.logp.exp() * (target.logp - logq)).sum(-1).mean()
        assert target.pulled is not None
        lse = _LogSumExp.apply(normed, self.w_u, self.scale)
        return (target.neg_entropy - (normed * target.pulled).sum(-1) + lse).mean()


class _LogSumExp(torch.autograd.Function):
    """``logsumexp(scale * x @ w_u)`` per row; its gradient is ``scale * softmax @ w_u^T``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w_u: Tensor, scale: float) -> Tensor:
        logits = (x @ w_u).mul_(scale) if scale != 1.0 else x @ w_u
        lse = torch.logsumexp(logits, -1)
        ctx.save_for_backward(logits, lse, w_u)
        ctx.scale = scale
        return lse

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, lse, w_u = ctx.saved_tensors
        probs = logits.sub_(lse.unsqueeze(-1)).exp_().mul_(grad.unsqueeze(-1) * ctx.scale)
        return probs @ w_u.T, None, None
