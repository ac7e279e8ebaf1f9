"""The logit lens, in the paper's convention and in TransformerLens 3.x's, streamed.

A *readout* is the residual stream before block ``k`` (``k = 0`` is the embeddings) or, for
``k = n_layers``, after the last block. The lens maps it to logits through the final norm and
the unembedding ``W_U``, without the unembedding bias ``b_U`` (with ``fold_ln`` the final norm's
bias lives in ``b_U``, so it is left out too). Two conventions differ in *which statistics* the
final norm uses (docs/lens.md):

* ``"paper"``: every readout is centred (LayerNorm-type final norms only; not RMSNorm) and divided
  by the **final** readout's cached norm scale, ``ln_final.hook_scale``, as TransformerLens 1.x's
  ``accumulated_resid(apply_ln=True)`` did for the paper. In TransformerLens 3.9 that is
  ``cache.apply_ln_to_stack(cache.accumulated_resid(), layer=n_layers, recompute_ln=False)``.
  Early readouts have a far smaller norm than the final one, so their logits are small and their
  distributions near-uniform.
* ``"per_layer_norm"``: the final norm is re-applied to every readout with that readout's own
  statistics, which is what ``cache.accumulated_resid(apply_ln=True)`` does in TransformerLens 3.x.
  Every readout is put on the output's scale, so early distributions can be sharp.

At ``k = n_layers`` both conventions are the model's own final norm, so the last readout is the
model's output distribution whenever the model has no unembedding bias.

If the final norm was not folded into ``W_U`` (``fold_ln=False``), its weight (but not its bias) is
applied after normalising, so folded and unfolded models read the same. A model's output logit
soft-cap (Gemma 2) is applied to lens logits as to the output.

Streaming (:func:`iter_lens`). Every reduction needs the final readout first: the paper's
convention divides by its scale, and every convention compares each readout with the final
distribution (KL, agreement). The forward pass produces the readouts in depth order, so
:func:`iter_lens` keeps the d_model-wide readouts of **one batch** (``(n_layers + 1) x batch_size x
(pos - 2) x d_model`` fp32 numbers, the scored positions only) and, after the batch's forward pass,
walks over chunks of ``chunk_tokens`` positions, each readout in turn. The vocabulary-wide logits
exist for one readout and one chunk at a time (plus the final readout's, which a consumer keeps as
the reference). The alternative, a first pass for the final scale followed by a second, streaming
pass, keeps memory independent of depth but has to rebuild the final reference distribution for
every readout and chunk (or hold it vocabulary-wide for the whole batch), costing about half as
much again on a small-vocabulary-heavy model like SmolLM2; the readouts are ``d_vocab / d_model``
(85 for SmolLM2) times narrower than logits, so one batch of them costs about as much memory as a
chunk or two of logits. Lower ``batch_size`` to bound memory on deep, wide models.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from stages_of_inference._tl import HAS_HOOKED, Model

if HAS_HOOKED:
    from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre
else:  # TransformerLens 4: no HookedTransformer norms (the lens reads a HookedTransformer)
    LayerNorm = LayerNormPre = RMSNorm = RMSNormPre = type("Removed", (), {})

from stages_of_inference import self_check
from stages_of_inference._utils import check_count, check_model, check_tokens
from stages_of_inference._utils import progress as _progress
from stages_of_inference.backends import as_seam
from stages_of_inference.backends.bridge_fast import norm_parameters
from stages_of_inference.batch import Tokens
from stages_of_inference.interventions.hooks import ResidualReadout, collect, observe_in_fp32
from stages_of_inference.metrics import DEFAULT_CHUNK_TOKENS, log_probs, scored_positions
from stages_of_inference.precision import autocast, check_precision

if TYPE_CHECKING:  # annotations only: tuned_lens reads readouts through this module
    from stages_of_inference.tuned_lens import TunedLens

__all__ = [
    "CONVENTIONS",
    "LensChunk",
    "apply_lens_norm",
    "Convention",
    "check_convention",
    "collect_readouts",
    "convention_name",
    "convention_record",
    "iter_lens",
    "lens_logits",
    "unembed",
]

CONVENTIONS: tuple[str, ...] = ("paper", "per_layer_norm")
"""The logit-lens conventions named by a string: ``"paper"`` (final-layer scale) and
``"per_layer_norm"`` (own statistics). The third, ``"tuned"``, is a trained
:class:`~stages_of_inference.tuned_lens.TunedLens` passed in their place."""

Convention = Union[str, "TunedLens"]
"""What a ``convention`` argument takes: ``"paper"``, ``"per_layer_norm"`` or a ``TunedLens``."""


def _is_tuned(convention: Any) -> bool:
    """A translated lens (:class:`~stages_of_inference.tuned_lens.TunedLens`), told by what it does."""
    return hasattr(convention, "translate_") and hasattr(convention, "kind") and hasattr(convention, "check")


def check_convention(convention: Any) -> Any:
    """Return ``convention`` if it is a lens convention, else raise a ``ValueError``.

    Example:
        >>> check_convention("paper")
        'paper'
        >>> check_convention("tuned")
        Traceback (most recent call last):
        ...
        ValueError: the tuned lens is a trained TunedLens, not a name: pass convention=train_tuned_lens(model, training_tokens) or load_tuned_lens(path)
    """
    if _is_tuned(convention):
        return convention
    if convention == "tuned":
        raise ValueError("the tuned lens is a trained TunedLens, not a name: pass convention=train_tuned_lens(model, "
                         "training_tokens) or load_tuned_lens(path)")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown logit-lens convention {convention!r}; allowed: {', '.join(map(repr, CONVENTIONS))} "
                         "or a TunedLens")
    return convention


def convention_name(convention: Convention) -> str:
    """What a table's ``convention`` column says: the name, or a ``TunedLens``'s kind (``"tuned"``,
    ``"jacobian"``).

    Example:
        >>> convention_name("per_layer_norm")
        'per_layer_norm'
    """
    return convention.kind if _is_tuned(check_convention(convention)) else str(convention)


def convention_record(convention: Convention) -> Any:
    """What a table's provenance records of the convention: the name, or the tuned lens's key,
    settings and training tokens.
    """
    return convention.describe() if _is_tuned(check_convention(convention)) else convention


@dataclass(frozen=True)
class _FinalNorm:
    """What the model's final norm does: centre or not, its epsilon, its (unfolded) weight."""

    kind: Literal["none", "ln", "rms"]
    eps: float
    weight: Tensor | None

    @classmethod
    def of(cls, model: Model) -> _FinalNorm:
        ln = getattr(model, "ln_final", None)
        if ln is None or isinstance(ln, torch.nn.Identity) or model.cfg.normalization_type is None:
            return cls("none", 0.0, None)
        if hasattr(ln, "uses_rms_norm"):  # a TransformerBridge's norm component
            found = self_check.finding(model)  # load_model checked it reads this norm right
            if found is not None and found.lens:
                raise NotImplementedError(found.lens)
            return cls(*norm_parameters(ln, model.cfg))
        if isinstance(ln, (LayerNorm, LayerNormPre)):
            kind: Literal["ln", "rms"] = "ln"
        elif isinstance(ln, (RMSNorm, RMSNormPre)):
            kind = "rms"
        else:
            raise TypeError(
                f"the logit lens knows LayerNorm and RMSNorm final norms; this model's ln_final is {type(ln).__name__}"
            )
        w = getattr(ln, "w", None)
        return cls(kind, float(ln.eps), None if w is None else w.detach().float())

    def scale(self, x: Tensor) -> Tensor:
        """The scale this norm computes for (already centred, if LN) ``x``: sqrt(mean(x^2) + eps)."""
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()


def apply_lens_norm(
    model: Model,
    readouts: Float[Tensor, "*rows d_model"],
    convention: str = "paper",
    final_scale: Float[Tensor, "*rows 1"] | None = None,
) -> Float[Tensor, "*rows d_model"]:
    """Apply the final norm to residual readouts in one lens convention (fp32, out of place).

    Args:
        model: the model whose final norm (``ln_final``) is used.
        readouts: residual-stream vectors, any leading shape (e.g. ``[layer, batch, pos]``).
        convention: ``"paper"`` (centre for LayerNorm, divide by ``final_scale``) or
            ``"per_layer_norm"`` (each vector normalised with its own statistics).
        final_scale: ``ln_final.hook_scale`` of the same positions (broadcast against
            ``readouts``); required by ``"paper"`` for models with a final norm, ignored otherwise.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=4, n_ctx=4, d_head=2, d_vocab=5, act_fn="relu", normalization_type="LNPre"))
        >>> x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
        >>> apply_lens_norm(m, x, "paper", final_scale=torch.tensor([[2.0]]))
        tensor([[-1.0000, -0.5000,  0.0000,  1.5000]])
        >>> round(apply_lens_norm(m, x, "per_layer_norm").pow(2).mean().item(), 4)
        1.0
    """
    if _is_tuned(check_convention(convention)):
        raise ValueError("apply_lens_norm reads one readout in a named convention; a tuned lens translates readout k "
                         "first: apply_lens_norm(model, lens.translate(k, readout), 'per_layer_norm')")
    norm = _FinalNorm.of(model)
    x = readouts.float()
    if norm.kind == "none":
        return x.clone()
    if norm.kind == "ln":
        x = x - x.mean(-1, keepdim=True)
    if convention == "paper":
        if final_scale is None:
            raise ValueError('convention "paper" needs final_scale: the cached ln_final.hook_scale of the same positions')
        x = x / final_scale.float()
    else:
        x = x / norm.scale(x)
    if norm.weight is not None:
        x = x * norm.weight.to(x.device)
    return x


def unembed(
    model: Model, normalized: Float[Tensor, "*rows d_model"], precision: str = "fp32"
) -> Float[Tensor, "*rows d_vocab"]:
    """Lens logits of normalised readouts: ``normalized @ W_U``, no ``b_U`` (soft-capped like the
    output when the model soft-caps its logits), returned in fp32; the product runs in
    ``precision`` (:mod:`stages_of_inference.precision`).

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=4, n_ctx=4, d_head=2, d_vocab=5, act_fn="relu"))
        >>> unembed(m, torch.zeros(3, 4)).shape
        torch.Size([3, 5])
    """
    seam = as_seam(model)
    with autocast(precision, normalized.device):
        logits = (normalized.float() @ seam.W_U.detach().float()).float()
    if seam.logit_scale != 1.0:  # the family's output scale (Granite, Cohere): the lens reads what the output would
        logits = logits * seam.logit_scale
    cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def collect_readouts(
    model: Model, batch: Int[Tensor, "batch pos"], positions: slice, points: Sequence[int],
    precision: str = "fp32",
) -> tuple[Tensor, Tensor | None]:
    """One forward pass; returns the readouts ``[point, batch, kept pos, d_model]`` (fp32) at
    ``points`` and the final norm's scale ``[batch, kept pos, 1]`` (None without a final norm).
    """
    n_pos = len(range(*positions.indices(batch.shape[1])))
    buf = torch.empty(len(points), batch.shape[0], n_pos, model.cfg.d_model, dtype=torch.float32, device=batch.device)
    slot = {p: i for i, p in enumerate(points)}
    box: dict[str, Tensor] = {}

    def store(point: int, resid: Tensor) -> None:
        buf[slot[point]] = resid[:, positions].float()

    def store_scale(scale: Tensor, hook: object) -> None:
        box["scale"] = scale[:, positions].float()

    hooks = []
    if _FinalNorm.of(model).kind != "none":
        hooks.append(("ln_final.hook_scale", store_scale))
    if precision != "fp32":
        hooks = [(name, observe_in_fp32(fn)) for name, fn in hooks]
    collect(model, batch, [ResidualReadout(store, points)], batch_size=batch.shape[0], fwd_hooks=hooks, progress=False,
            precision=precision)
    return buf, box.get("scale")


def _normalize_inplace(model: Model, buf: Tensor, convention: Convention, final_scale: Tensor | None,
                       points: Sequence[int]) -> Tensor:
    """``apply_lens_norm`` on a ``[point, batch, pos, d_model]`` buffer of readouts ``points``, in
    place (saves a copy); a tuned lens translates each readout first, then reads it per layer.
    """
    if _is_tuned(convention):
        for slot, point in enumerate(points):
            convention.translate_(point, buf[slot])
        convention = "per_layer_norm"
    norm = _FinalNorm.of(model)
    if norm.kind == "none":
        return buf
    if norm.kind == "ln":
        buf.sub_(buf.mean(-1, keepdim=True))
    if convention == "paper":
        assert final_scale is not None
        buf.div_(final_scale)
    else:
        buf.div_(norm.scale(buf))
    if norm.weight is not None:
        buf.mul_(norm.weight.to(buf.device))
    return buf


def lens_logits(
    model: Model,
    tokens: Tokens,
    convention: Convention = "paper",
    points: Sequence[int] | None = None,
    precision: str = "fp32",
) -> Float[Tensor, "layer batch pos d_vocab"]:
    """Logit-lens logits of every readout at every position, all at once (small inputs only).

    Holds ``len(points) x batch x pos x d_vocab`` fp32 numbers: for a handful of prompts, plots
    and checks. For statistics over a corpus use :func:`iter_lens` or
    :func:`stages_of_inference.stages.feature_engineering.logit_lens`, which stream.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids.
        convention: ``"paper"``, ``"per_layer_norm"`` (module docstring) or a
            :class:`~stages_of_inference.tuned_lens.TunedLens`.
        points: readout points (0 = embeddings ... ``n_layers`` = output); all by default.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the dtype of the model's products and of the
            lens unembedding (:mod:`stages_of_inference.precision`); readouts and logits are fp32.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu", normalization_type="LNPre"))
        >>> tokens = torch.tensor([[0, 1, 2]])
        >>> lens = lens_logits(m, tokens)
        >>> lens.shape, bool(torch.allclose(lens[-1], m(tokens) - m.b_U, atol=1e-5))
        (torch.Size([3, 1, 3, 5]), True)
    """
    model = check_model(model)
    tokens = check_tokens(model, tokens, min_len=1)
    _check_tuned(model, convention)
    points = _check_points(model, points)
    need_final = convention == "paper" and _FinalNorm.of(model).kind != "none"
    with torch.inference_mode():
        buf, scale = collect_readouts(model, tokens, slice(None), points, precision)
        if need_final and scale is None:  # pragma: no cover - the hook always fires
            raise RuntimeError("ln_final.hook_scale did not fire")
        _normalize_inplace(model, buf, convention, scale, points)
        return unembed(model, buf, precision)


def _check_tuned(model: Model, convention: Convention) -> None:
    """Check the convention, and that a tuned lens was trained for this model."""
    if _is_tuned(check_convention(convention)):
        convention.check(model)


def _check_points(model: Model, points: Sequence[int] | None) -> list[int]:
    n = model.cfg.n_layers
    if points is None:
        return list(range(n + 1))
    points = [int(p) for p in points]
    if not points:
        raise ValueError("points is empty: name at least one readout (0 = embeddings ... n_layers = output)")
    for p in points:
        if not 0 <= p <= n:
            raise ValueError(f"readout point {p} out of range: 0 (embeddings) .. {n} (output)")
    return points


@dataclass(frozen=True)
class LensChunk:
    """Normalised readouts of a chunk of scored token positions, ready to unembed one at a time.

    Rows are scored positions (``1 .. pos - 2``, the same rows as :mod:`stages_of_inference.metrics`)
    in sequence-major order. ``readouts[k]`` is readout ``k`` (0 = embeddings ... ``n_layers`` =
    output) after the lens norm; :meth:`logits` unembeds one of them.

    Attributes:
        sequences: index (into the full token batch) of each row's sequence.
        positions: position of each row in its sequence.
        targets: the true next token of each row.
        readouts: ``[layer, n, d_model]`` normalised readouts (fp32).
        precision: the precision of the lens unembedding (:mod:`stages_of_inference.precision`).
    """

    sequences: Int[Tensor, " n"]
    positions: Int[Tensor, " n"]
    targets: Int[Tensor, " n"]
    readouts: Float[Tensor, "layer n d_model"]
    model: Model
    precision: str = "fp32"

    @property
    def n_points(self) -> int:
        """Number of readouts (``n_layers + 1``)."""
        return int(self.readouts.shape[0])

    def logits(self, point: int) -> Float[Tensor, "n d_vocab"]:
        """fp32 lens logits of readout ``point`` (negative indices count from the output)."""
        with torch.inference_mode():
            return unembed(self.model, self.readouts[point], self.precision)

    def logprobs(self, point: int) -> Float[Tensor, "n d_vocab"]:
        """fp32 lens log-probabilities of readout ``point``."""
        with torch.inference_mode():
            return log_probs(self.logits(point))


def iter_lens(
    model: Model,
    tokens: Tokens,
    convention: Convention = "paper",
    *,
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    precision: str = "fp32",
) -> Iterator[LensChunk]:
    """Stream the logit lens over a token batch: one :class:`LensChunk` of scored positions at a time.

    One forward pass per batch of ``batch_size`` sequences keeps that batch's readouts (module
    docstring: why); each chunk holds at most ``chunk_tokens`` positions of one batch. Call
    ``chunk.logprobs(k)`` for one readout at a time so that only one chunk of vocabulary-wide
    numbers per readout exists.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids, BOS first, at least 3 positions.
        convention: ``"paper"``, ``"per_layer_norm"`` or a :class:`~stages_of_inference.tuned_lens.TunedLens`.
        batch_size: sequences per forward pass.
        chunk_tokens: scored positions per chunk.
        progress: show a progress bar over batches.
        precision: the dtype of the model's products and of the lens unembedding (``"fp32"``,
            ``"bf16"``, ``"fp16"``; :mod:`stages_of_inference.precision`).

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8, d_head=4, d_vocab=5, act_fn="relu", normalization_type="LNPre"))
        >>> chunks = list(iter_lens(m, torch.zeros(3, 6, dtype=torch.long), chunk_tokens=5, progress=False))
        >>> [c.readouts.shape[1] for c in chunks], chunks[0].logprobs(0).shape
        ([5, 5, 2], torch.Size([5, 5]))
    """
    model = check_model(model)
    tokens = check_tokens(model, tokens, min_len=3)
    _check_tuned(model, convention)
    batch_size = check_count(batch_size, "batch_size", "a positive number of sequences")
    chunk_tokens = check_count(chunk_tokens, "chunk_tokens", "a positive number of token positions")
    precision = check_precision(precision)
    n_seq, pos = tokens.shape
    keep = scored_positions(pos)
    n_kept = pos - 2
    points = list(range(model.cfg.n_layers + 1))
    for start in _progress(range(0, n_seq, batch_size), progress, desc=f"logit lens ({convention_name(convention)})"):
        with torch.inference_mode():
            batch = tokens[start : start + batch_size]
            b = batch.shape[0]
            buf, scale = collect_readouts(model, batch, keep, points, precision)
            _normalize_inplace(model, buf, convention, scale, points)
            flat = buf.view(len(points), b * n_kept, model.cfg.d_model)
            sequences = torch.arange(start, start + b, device=tokens.device).repeat_interleave(n_kept)
            positions = torch.arange(1, pos - 1, device=tokens.device).repeat(b)
            targets = batch[:, keep.start + 1 :].reshape(-1)
        for r0 in range(0, b * n_kept, chunk_tokens):
            rows = slice(r0, min(r0 + chunk_tokens, b * n_kept))
            yield LensChunk(sequences[rows], positions[rows], targets[rows], flat[:, rows], model, precision)
        del buf, flat
