"""The load-time self-check: does the library's forward of a model give the model's own numbers?

:func:`stages_of_inference.load_model` converts a Hugging Face checkpoint to a TransformerLens
model (a ``HookedTransformer``, or a ``TransformerBridge`` in compatibility mode, whose norms are
folded into the next weights), and the library then runs its blocks itself, through the model seam.
Either step can be wrong for a family nobody tested, and a wrong forward gives wrong science that
looks right. So every load compares, on :data:`PROBE_LENGTH` tokens, the seam's forward with every
block in order against the Hugging Face model's own forward on the weights as stored, as the
largest KL divergence at any position (log-probabilities, so the per-row constant that centring
the unembedding adds does not count). It runs in fp32, before any cast to the requested dtype: it
checks the conversion and the seam, which a dtype does not change (what a lower precision changes
is measured by the sweep's own precision check).

Past :data:`TOLERANCE_NATS` the load fails in one line naming the family and the size of the
difference, or, where the difference comes from compatibility mode alone (the raw Bridge agrees),
the Bridge is rebuilt without it, a warning says so, and the analyses that need processed weights
refuse in their own words. The finding is kept with the model for as long as it lives
(:func:`finding`) and recorded in every result's provenance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from stages_of_inference.backends import as_seam, output_logits, weight_mode
from stages_of_inference.backends.bridge_fast import norm_parameters
from stages_of_inference.backends.state import exclusive, recalled, remembered

__all__ = ["PROBE_LENGTH", "TOLERANCE_16BIT_NATS", "TOLERANCE_NATS", "SelfCheck", "check", "final_norm_problem",
           "finding", "keep",
           "largest_kl", "probe_tokens", "reference_logits", "seam_logits", "tolerance"]

PROBE_LENGTH = 24
"""Tokens in the self-check's one sequence."""

TOLERANCE_NATS = 1e-4
"""The largest KL divergence, at any position, the self-check accepts for a model held in fp32
(tiny models of the tested families agree to 1e-6; a dropped output scale or a moved model is
1e-3 to 1)."""

TOLERANCE_16BIT_NATS = 1e-2
"""The same for a model held in 16 bits (a Hugging Face model object in bf16 or fp16, wrapped as it
is): the two forwards round differently, by up to about 1e-3 nats."""


def tolerance(dtype: str) -> float:
    """The self-check's tolerance for a model held in ``dtype`` (``"float32"``, ``"bfloat16"``, ...).

    Example:
        >>> tolerance("float32"), tolerance("bfloat16")
        (0.0001, 0.01)
    """
    return TOLERANCE_NATS if dtype in ("float32", "float64") else TOLERANCE_16BIT_NATS


@dataclass(frozen=True)
class SelfCheck:
    """What the load-time self-check found.

    Attributes:
        kl_nats: the largest KL divergence at any position, Hugging Face to library (``nan``: not
            run, ``reason`` says why).
        tokens: the tokens compared.
        weights: how the checked model holds its weights (``"processed"`` or ``"raw"``).
        dtype: the dtype it was checked in.
        reason: why it was not run, or how the load fell back; ``""`` otherwise.
        lens: why the logit lens cannot read this model's final norm (:func:`final_norm_problem`),
            ``""`` where it can; the lens refuses the model with this line.
    """

    kl_nats: float
    tokens: int = PROBE_LENGTH
    weights: str = "processed"
    dtype: str = "float32"
    reason: str = ""
    lens: str = ""

    @property
    def passed(self) -> bool:
        """Whether the difference is within the tolerance for the dtype it was checked in."""
        return math.isfinite(self.kl_nats) and self.kl_nats <= tolerance(self.dtype)

    def record(self) -> dict[str, Any]:
        """JSON-friendly, for provenance (``kl_nats`` ``None`` where not run)."""
        out = asdict(self)
        out["kl_nats"] = self.kl_nats if math.isfinite(self.kl_nats) else None
        return out


def probe_tokens(d_vocab: int, device: str | torch.device = "cpu") -> Tensor:
    """The self-check's tokens: one sequence of :data:`PROBE_LENGTH` ids drawn with a fixed seed.

    Example:
        >>> probe_tokens(10).shape, bool(probe_tokens(10).max() < 10)
        (torch.Size([1, 24]), True)
    """
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, d_vocab, (1, PROBE_LENGTH), generator=generator).to(device)


def reference_logits(hf_model: Any, tokens: Tensor) -> Tensor:
    """The Hugging Face model's own logits for ``tokens`` (no cache), in fp32 on the CPU.

    Example:
        >>> import transformers
        >>> config = transformers.LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        ...                                   num_attention_heads=2, num_key_value_heads=1)
        >>> reference_logits(transformers.LlamaForCausalLM(config).eval(), probe_tokens(11)).shape
        torch.Size([1, 24, 11])
    """
    with torch.inference_mode():
        return hf_model(input_ids=tokens.to(next(hf_model.parameters()).device), use_cache=False).logits.float().cpu()


def seam_logits(model: Any, tokens: Tensor) -> Tensor:
    """The library's forward of ``model``: embed, every block in order through the seam, the final
    norm and the output (with the family's output scale and soft-cap), in fp32 on the CPU.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=24, d_head=4, d_vocab=5, act_fn="relu"))
        >>> tokens = probe_tokens(5)
        >>> bool(torch.allclose(seam_logits(m, tokens), m(tokens), atol=1e-5))
        True
    """
    seam = as_seam(model)
    with exclusive(seam.model), torch.inference_mode():
        embedded = seam.embed(tokens.to(seam.device))  # run_plan's loop, which sits a layer above
        residual = embedded.residual
        for layer in range(seam.n_layers):
            residual = seam.run_block(layer, residual, embedded, layer)
        return output_logits(seam, seam.final_norm(residual)).float().cpu()


def largest_kl(reference: Tensor, found: Tensor) -> float:
    """The largest KL divergence of ``found`` from ``reference`` at any position (float64 nats).

    Example:
        >>> x = torch.randn(1, 3, 5)
        >>> largest_kl(x, x + 2.0) < 1e-12  # a constant per row is no difference
        True
    """
    ref, got = reference.double().log_softmax(-1), found.double().log_softmax(-1)
    return float((ref.exp() * (ref - got)).sum(-1).max())


def check(model: Any, reference: Tensor, tokens: Tensor) -> SelfCheck:
    """Compare ``model``'s library forward on ``tokens`` with ``reference``.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=24, d_head=4, d_vocab=5, act_fn="relu"))
        >>> tokens = probe_tokens(5)
        >>> check(m, m(tokens), tokens).passed, check(m, torch.zeros(1, 24, 5), tokens).passed
        (True, False)
    """
    dtype = str(next(as_seam(model).model.parameters()).dtype).removeprefix("torch.")
    return SelfCheck(largest_kl(reference, seam_logits(model, tokens)), tokens.shape[-1], weight_mode(model), dtype,
                     lens=final_norm_problem(model))


def final_norm_problem(model: Any) -> str:
    """Why the logit lens cannot reproduce a Bridge's final norm from what it reads off it (its
    kind, epsilon and weight, :func:`~stages_of_inference.backends.bridge_fast.norm_parameters`),
    or ``""`` where it can: the norm's own output on a few random vectors against LayerNorm or
    RMSNorm with those (and the norm's bias). A ``HookedTransformer``'s final norm is one of
    TransformerLens' own classes, which the lens reads directly: ``""``.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> final_norm_problem(HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4,
        ...                                                              d_vocab=5, act_fn="relu")))
        ''
    """
    ln = getattr(model, "ln_final", None)
    if ln is None or not hasattr(ln, "uses_rms_norm"):
        return ""
    seam = as_seam(model)
    kind, eps, weight = norm_parameters(ln, model.cfg)
    x = torch.randn(4, int(model.cfg.d_model), generator=torch.Generator().manual_seed(0)).to(seam.device)
    with exclusive(model), torch.inference_mode():
        expected = seam.final_norm(x.to(next(model.parameters()).dtype)).float().cpu()
        y = x.float().cpu()
        if kind == "ln":
            y = y - y.mean(-1, keepdim=True)
        y = y / (y.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        if weight is not None:
            y = y * weight.cpu()
        bias = getattr(ln, "bias", None)
        if isinstance(bias, Tensor):
            y = y + bias.detach().float().cpu()
    difference = float((y - expected).abs().max() / (expected.abs().max() + 1e-12))
    if difference <= 1e-4:
        return ""
    norm = type(getattr(ln, "original_component", ln)).__name__
    what = {"ln": "LayerNorm", "rms": "RMSNorm"}.get(kind, kind)
    return (f"the logit lens cannot read this model's final norm ({norm}): a {what} with the epsilon and "
            f"weight it reads off differs from the norm's own output by a relative {difference:.2g}; supported: "
            "LayerNorm and RMSNorm final norms (Gemma's offset weights included)")


def keep(model: Any, found: SelfCheck) -> None:
    """Keep ``found`` with ``model`` (read back by :func:`finding`).

    Example:
        >>> m = torch.nn.Linear(2, 2)
        >>> finding(m) is None
        True
        >>> keep(m, SelfCheck(1e-9))
        >>> finding(m).passed
        True
    """
    remembered(model, "self_check", lambda: found)


def finding(model: Any) -> SelfCheck | None:
    """What the self-check found when ``model`` was loaded (``None`` for a model this library did
    not load).
    """
    return recalled(model, "self_check")
