"""logit_metrics and LinearReference against the reference implementations of metrics.py."""

from __future__ import annotations

import math

import pytest
import torch

from stages_of_inference.metrics import (
    PROB_CLAMP,
    LinearReference,
    distribution_metrics,
    kl_nats,
    log_probs,
    logit_metrics,
)
from tests.authors import authors_entropy_bits

ATOL = 1e-5


def _random_logits(n: int, d_vocab: int, scale: float, seed: int, peak: float = 0.0) -> torch.Tensor:
    """Gaussian logits; with ``peak``, one token per row is raised by ``peak``, so that most
    probabilities of the row are tiny (under ``PROB_CLAMP`` for ``peak`` of 20 and more)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, d_vocab, generator=gen) * scale
    if peak:
        logits[torch.arange(n), torch.randint(0, d_vocab, (n,), generator=gen)] += peak
    return logits


def _assert_same(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> None:
    assert set(new) == set(old)
    for key, value in old.items():
        if value.dtype == torch.bool or not value.is_floating_point():
            assert torch.equal(new[key], value), key
        else:
            assert new[key].dtype == value.dtype, key
            torch.testing.assert_close(new[key], value, atol=ATOL, rtol=0, msg=key)


# (scale, peak): peak 20 leaves most p just under 1e-9, peak 40 leaves nearly all far under it
@pytest.mark.parametrize(("scale", "peak"), [(0.5, 0.0), (3.0, 0.0), (8.0, 0.0), (1.0, 20.0), (1.0, 40.0)])
@pytest.mark.parametrize("overwrite", [False, True])
def test_logit_metrics_equal_distribution_metrics(scale: float, peak: float, overwrite: bool) -> None:
    n, d_vocab = 37, 1000
    logits = _random_logits(n, d_vocab, scale, seed=int(scale * 10 + peak), peak=peak)
    ref_logits = _random_logits(n, d_vocab, scale, seed=7, peak=peak)
    targets = torch.randint(0, d_vocab, (n,), generator=torch.Generator().manual_seed(1))
    if peak:
        assert (log_probs(logits).exp() < 1e-9).float().mean() > 0.25
    old = distribution_metrics(log_probs(logits), targets, ref_logprobs=log_probs(ref_logits))
    work = logits.clone()
    new = logit_metrics(work, targets, ref=log_probs(ref_logits), overwrite=overwrite)
    _assert_same(new, old)
    if not overwrite:
        assert torch.equal(work, logits)
    # with a scratch buffer larger than needed, and a separate ref_top1
    scratch = torch.empty(n + 5, d_vocab)
    ref_top1 = ref_logits.max(dim=-1).indices
    old = distribution_metrics(log_probs(logits), targets, ref_top1=ref_top1)
    _assert_same(logit_metrics(logits.clone(), targets, ref_top1=ref_top1, overwrite=True, scratch=scratch), old)
    # five rows at a time (37 = 7 x 5 + 2), the row maxima given by the caller
    old = distribution_metrics(log_probs(logits), targets, ref_logprobs=log_probs(ref_logits))
    top = logits.max(dim=-1)
    new = logit_metrics(logits.clone(), targets, ref=log_probs(ref_logits), overwrite=True,
                        scratch=torch.empty(5, d_vocab), row_max=(top.values, top.indices))
    _assert_same(new, old)
    with pytest.raises(ValueError, match="at least one row"):
        logit_metrics(logits.clone(), targets, scratch=torch.empty(0, d_vocab))


def test_logit_metrics_clamp_matters() -> None:
    """Peaked rows over a real-sized vocabulary: the clamped entropy differs from the unclamped
    one by more than the tolerance, and the new one matches the clamped one."""
    logits = _random_logits(16, 50000, 1.0, seed=3, peak=21.0)
    lp = log_probs(logits)
    unclamped = -(lp.exp() * lp).sum(-1) / torch.log(torch.tensor(2.0))
    old = distribution_metrics(lp, torch.zeros(16, dtype=torch.long))
    new = logit_metrics(logits, torch.zeros(16, dtype=torch.long))
    clamp_effect = (old["entropy_bits"] - unclamped).abs().max()
    assert clamp_effect > ATOL
    # over 50000 entries the fp32 log-softmax path itself is off by ~2.6e-5 bits here: compare
    # both with the clamped entropy computed in float64
    exact = authors_entropy_bits(logits)
    # the clamp-inside-the-log reading the library used before 2026-11-30 differs by more than that
    lp64 = logits.double().log_softmax(-1)
    inside_log = -(lp64.exp() * lp64.clamp_min(math.log(PROB_CLAMP))).sum(-1) / math.log(2)
    assert (inside_log - exact).abs().max() > 1e-5
    assert (new["entropy_bits"].double() - exact).abs().max() < min(ATOL, clamp_effect / 10)
    assert (old["entropy_bits"].double() - exact).abs().max() < 5 * ATOL


def test_logit_metrics_other_dtypes() -> None:
    logits = _random_logits(8, 300, 4.0, seed=5).to(torch.bfloat16)
    targets = torch.arange(8)
    old = distribution_metrics(log_probs(logits), targets)
    half = logits.clone()
    _assert_same(logit_metrics(half, targets, overwrite=True), old)
    assert torch.equal(half, logits)  # a non-fp32 input is never overwritten


def _unembedding(d_model: int, d_vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d_model, d_vocab, generator=gen), torch.randn(d_vocab, generator=gen)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.0])
def test_linear_reference_kl(scale: float) -> None:
    n, d_model, d_vocab = 29, 24, 2000
    w, b = _unembedding(d_model, d_vocab, seed=2)
    gen = torch.Generator().manual_seed(9)
    x_ref = torch.randn(n, d_model, generator=gen) * scale
    x = x_ref + torch.randn(n, d_model, generator=gen) * scale * 0.3
    ref_logits, logits = x_ref @ w + b, x @ w + b
    ref = LinearReference.from_logits(ref_logits, w, b)
    expected = kl_nats(log_probs(ref_logits), log_probs(logits))
    assert expected.max() > 0.1
    kl = ref.kl_nats(x, logits.logsumexp(-1))
    assert kl.dtype == torch.float64
    torch.testing.assert_close(kl.float(), expected, atol=ATOL, rtol=0)
    # through logit_metrics, a chunk of rows at a time, with agree against the reference's top-1
    targets = torch.randint(0, d_vocab, (n,), generator=gen)
    old = distribution_metrics(log_probs(logits), targets, ref_logprobs=log_probs(ref_logits))
    rows = slice(3, 20)
    new = logit_metrics(logits[rows].clone(), targets[rows], ref=ref[rows], resid=x[rows], overwrite=True)
    _assert_same(new, {key: value[rows] for key, value in old.items()})


def test_linear_reference_kl_zero_for_the_reference() -> None:
    """Plan == reference: KL is 0 to within 1e-5 without a stored reference (what is left is the
    fp32 rounding of the logits themselves, which the exact KL of identical logits cancels)."""
    n, d_model, d_vocab = 40, 32, 3000
    w, b = _unembedding(d_model, d_vocab, seed=4)
    x = torch.randn(n, d_model, generator=torch.Generator().manual_seed(8))
    logits = x @ w + b
    ref = LinearReference.from_logits(logits, w, b)
    m = logit_metrics(logits.clone(), torch.zeros(n, dtype=torch.long), ref=ref, resid=x)
    assert m["kl_nats"].abs().max() < ATOL
    assert bool(m["agree"].all())
    exact = logit_metrics(logits, torch.zeros(n, dtype=torch.long), ref=log_probs(logits))
    assert exact["kl_nats"].abs().max() < ATOL


def test_linear_reference_without_bias_and_on_a_tiny_model(tiny_model) -> None:
    """The tiny models' own unembedding (W_U, b_U) and final residuals of random inputs."""
    w, b = tiny_model.unembed.W_U.detach(), tiny_model.unembed.b_U.detach()
    gen = torch.Generator().manual_seed(0)
    x_ref = torch.randn(50, w.shape[0], generator=gen)
    x = x_ref + 0.5 * torch.randn(50, w.shape[0], generator=gen)
    for bias in (b, None):
        ref_logits = x_ref @ w + (0 if bias is None else bias)
        logits = x @ w + (0 if bias is None else bias)
        ref = LinearReference.from_logits(ref_logits, w, bias)
        kl = ref.kl_nats(x, logits.logsumexp(-1)).float()
        torch.testing.assert_close(kl, kl_nats(log_probs(ref_logits), log_probs(logits)), atol=ATOL, rtol=0)
    assert len(ref) == 50 and len(ref[10:20]) == 10


def test_linear_reference_needs_resid() -> None:
    w, b = _unembedding(4, 10, seed=0)
    ref = LinearReference.from_logits(torch.randn(3, 4) @ w + b, w, b)
    with pytest.raises(ValueError, match="resid"):
        logit_metrics(torch.randn(3, 10), torch.zeros(3, dtype=torch.long), ref=ref)
