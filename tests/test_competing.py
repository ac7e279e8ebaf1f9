"""Competing readings of depth: the Mix-Compress-Refine signals and the pruning proxies against
their papers' definitions computed from TransformerLens' own activation cache in numpy, and the
rank correlation against its formula."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer

from stages_of_inference.stages.competing import (
    depth_proxies,
    matrix_entropy,
    phase_boundaries,
    proxy_agreement,
    spearman,
)


def _numpy_entropy(z: np.ndarray, alpha: float) -> float:
    """Renyi entropy of the trace-normalised Gram matrix's eigenvalues, over log T (Skean et al.'s formula)."""
    gram = z @ z.T
    lam = np.clip(np.linalg.eigvalsh(gram / np.trace(gram)), 0, None)
    if alpha == 1:
        h = -sum(v * math.log(v) for v in lam if v > 0)
    else:
        h = math.log(sum(v ** alpha for v in lam)) / (1 - alpha)
    return h / math.log(z.shape[0])


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
def test_matrix_entropy_is_its_formula(alpha: float) -> None:
    z = torch.randn(3, 12, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z[1, :, 1:] *= 1e-3  # nearly one direction: low entropy
    got = matrix_entropy(z, alpha).numpy()
    want = [_numpy_entropy(z[i].numpy(), alpha) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert got[1] < 0.5 < got[0] <= 1


def test_depth_proxies_equal_their_definitions_on_the_cache(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    out = depth_proxies(tiny_model, tiny_tokens, batch_size=2, progress=False)
    _, cache = tiny_model.run_with_cache(tiny_tokens)
    n = tiny_model.cfg.n_layers
    resid = [cache[f"blocks.{i}.hook_resid_pre"].double().numpy() for i in range(n)]
    resid.append(cache[f"blocks.{n - 1}.hook_resid_post"].double().numpy())
    readouts, blocks = out["readouts"], out["blocks"]
    for i, x in enumerate(resid):
        assert readouts.loc[i, "bos_norm"] == pytest.approx(np.linalg.norm(x[:, 0], axis=-1).mean(), rel=1e-5)
        want = np.mean([_numpy_entropy(x[s], 1.0) for s in range(len(x))])
        assert readouts.loc[i, "matrix_entropy"] == pytest.approx(want, rel=1e-5)
    for i in range(n):
        a, b = resid[i], resid[i + 1]
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        assert blocks.loc[i, "block_influence"] == pytest.approx(1 - cos.mean(), rel=1e-5, abs=1e-7)  # ShortGPT: every token
        assert blocks.loc[i, "angular_distance"] == pytest.approx(np.mean(np.arccos(cos[:, -1]) / np.pi), rel=1e-4)
        rel = np.linalg.norm(b - a, axis=-1)[:, 1:] / np.linalg.norm(a, axis=-1)[:, 1:]
        assert blocks.loc[i, "relative_update"] == pytest.approx(rel.mean(), rel=1e-5)
    assert out["blocks"].attrs["provenance"]["settings"]["alpha"] == 1.0


def test_spearman_and_its_interval_are_their_formulas() -> None:
    gen = np.random.default_rng(0)
    x = gen.normal(size=30)
    y = x + gen.normal(size=30)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))  # no ties
    d = rx - ry
    rho_want = 1 - 6 * (d ** 2).sum() / (30 * (30 ** 2 - 1))  # Spearman's formula without ties
    rho, low, high = spearman(x, y)
    assert rho == pytest.approx(rho_want, abs=1e-12)
    half = 1.6448536269514722 * math.sqrt(1.06 / 27)  # the normal's 95th percentile, Fieller et al.'s standard error
    assert (low, high) == pytest.approx((math.tanh(math.atanh(rho_want) - half), math.tanh(math.atanh(rho_want) + half)),
                                        abs=1e-9)


def test_proxy_agreement_and_phases_read_the_tables() -> None:
    blocks = pd.DataFrame({"layer": range(8), "block_influence": [8, 1, 2, 3, 4, 5, 6, 7],
                           "angular_distance": [1, 8, 7, 6, 5, 4, 3, 2], "relative_update": [1] * 8})
    sweep = pd.DataFrame({"kind": ["none"] + ["drop"] * 8, "layer": pd.array([None, *range(8)], dtype="Int64"),
                          "kl_nats": [0, 9, .1, .2, .3, .4, .5, .6, .7]})
    table = proxy_agreement(blocks, sweep).set_index("proxy")
    assert table.loc["block_influence", "spearman"] == pytest.approx(1) and table.loc["block_influence", "trusted"]
    assert table.loc["angular_distance", "spearman"] < 0 and not table.loc["angular_distance", "trusted"]
    assert math.isnan(table.loc["relative_update", "spearman"])  # a constant proxy ranks nothing
    readouts = pd.DataFrame({"readout": range(5), "bos_norm": [1, 1.5, 200, 210, 50], "matrix_entropy": [.8, .7, .1, .6, .7]})
    phases = phase_boundaries(readouts).set_index("phase")
    assert phases.loc["compression", "readout"] == 2 and phases.loc["refinement", "readout"] == 3
    flat = readouts.assign(matrix_entropy=[.9, .8, .7, .6, .5])  # no valley: refinement never begins
    assert phase_boundaries(flat).set_index("phase").loc["refinement", "readout"] == -1


def test_depth_proxies_bad_alpha(tiny_models: dict[str, HookedTransformer], tiny_tokens: torch.Tensor) -> None:
    for alpha in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            depth_proxies(tiny_models["gpt2"], tiny_tokens, alpha=alpha, progress=False)
