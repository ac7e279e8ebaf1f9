"""The sweep on a CUDA device, in fp32 and bf16 (marker ``gpu``; skipped, with the reason, on a
machine without CUDA). ``benchmarks/gpu_check.py`` runs these first.

On the GPU the references are the same as on the CPU: the authors' interventions (hook zeroing,
weight swap and rebuild) on the real embedded model, run in fp32, and in bf16 under torch's
autocast (TransformerLens' own blocks, products in bf16); and the sweep's peak memory must not grow
with the number of plans.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stages_of_inference as soi
from stages_of_inference.interventions.deviation import rank_correlation
from stages_of_inference.interventions.executor import evaluate_plans
from stages_of_inference.interventions.hooks import drop_layer
from tests.authors import weight_swapped
from tests.test_robustness import exact_scores

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (the gpu tests need one)"),
]

CASES = [("drop", 0), ("drop", 15), ("drop", 29), ("swap", 0), ("swap", 15), ("swap", 28)]


@pytest.fixture(scope="module")
def cuda_model():
    return soi.load_model("smollm2-135m", device="cuda")


@pytest.fixture(scope="module")
def cuda_tokens(cuda_model) -> torch.Tensor:
    return soi.load_tokens(cuda_model, corpus="default", n_sequences=8, seq_len=128, seed=0)


def _authors(model, tokens: torch.Tensor, kind: str, layer: int, base: torch.Tensor) -> dict[str, float]:
    if kind == "drop":
        logits = model.run_with_hooks(tokens, fwd_hooks=drop_layer(model, layer))
    else:
        logits = weight_swapped(model, layer)(tokens)
    return exact_scores(logits.float(), tokens, base.float())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_cuda_sweep_equals_the_authors_methods(cuda_model, cuda_tokens: torch.Tensor, precision: str) -> None:
    summary = soi.robustness_sweep(cuda_model, cuda_tokens, progress=False, precision=precision).summary
    tolerance = {"fp32": dict(kl=2e-4, rel=0.0, other=2e-4), "bf16": dict(kl=0.03, rel=0.05, other=0.03)}[precision]
    with torch.no_grad(), soi.precision.autocast(precision, "cuda"):
        base = cuda_model(cuda_tokens)
        for kind, layer in CASES:
            row = summary[(summary["kind"] == kind) & (summary["layer"] == layer)].iloc[0]
            want = _authors(cuda_model, cuda_tokens, kind, layer, base)
            assert abs(row["kl_nats"] - want["kl_nats"]) <= tolerance["kl"] + tolerance["rel"] * want["kl_nats"], (kind, layer)
            for key in ("loss", "accuracy"):
                assert abs(row[key] - want[key]) <= tolerance["other"], (kind, layer, key)


def test_bf16_on_cuda_meets_the_deviation_targets(cuda_model, cuda_tokens: torch.Tensor) -> None:
    exact = soi.robustness_sweep(cuda_model, cuda_tokens, progress=False).summary
    result = soi.robustness_sweep(cuda_model, cuda_tokens, progress=False, precision="bf16")
    low, damaged = result.summary, exact["kind"] != "none"
    dev = (low["kl_nats"] - exact["kl_nats"]).abs()
    assert (dev / exact["kl_nats"])[damaged].median() <= 0.01
    assert dev.max() <= 0.05
    assert rank_correlation(low["kl_nats"][damaged], exact["kl_nats"][damaged]) >= 0.99
    assert result.provenance["precision_check"]["stands"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_memory_does_not_grow_with_the_number_of_plans(cuda_model, cuda_tokens: torch.Tensor, precision: str) -> None:
    n = cuda_model.cfg.n_layers
    every = [soi.LayerPlan.drop(n, i) for i in range(n)] + [soi.LayerPlan.swap(n, i) for i in range(n - 1)]
    peaks = []
    for plans in (every[:6], every):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        evaluate_plans(cuda_model, cuda_tokens, plans, progress=False, precision=precision)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)
    assert peaks[1] <= 1.25 * peaks[0], peaks
    assert np.isfinite(peaks).all()
