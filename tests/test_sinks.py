"""Attention sinks, massive activations and residual norms (stages.sinks), against the same
numbers read literally off TransformerLens' activation cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

from stages_of_inference import plots
from stages_of_inference.stages.sinks import SINK_HEAD_THRESHOLD, sink_profile


def _reference(model: HookedTransformer, tokens: torch.Tensor) -> dict[str, list]:
    """Every statistic of the profile, from one run_with_cache of the whole batch, in float64."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    out: dict[str, list] = {k: [] for k in ("sink", "sink_sem", "share", "peak", "pos", "dim", "median", "norm", "bos")}
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double()  # [batch, head, q, k]
        per_seq_head = pattern[:, :, 1:, 0].mean(dim=-1)  # queries 1..T-1 to key 0
        per_seq = per_seq_head.mean(dim=1)
        out["sink"].append(float(per_seq.mean()))
        out["sink_sem"].append(float(per_seq.std() / len(per_seq) ** 0.5))
        out["share"].append(float((per_seq_head.mean(dim=0) > SINK_HEAD_THRESHOLD).double().mean()))
        x = cache[f"blocks.{layer}.hook_resid_pre"].double()
        a = x.abs()
        peak = a.max()
        b, p, d = (a == peak).nonzero()[0].tolist()
        out["peak"].append(float(peak))
        out["pos"].append(p)
        out["dim"].append(d)
        out["median"].append(float(torch.stack([a[i].flatten().median() for i in range(a.shape[0])]).median()))
        norms = x.norm(dim=-1)
        out["norm"].append(float(norms[:, 1:].mean()))
        out["bos"].append(float(norms[:, 0].mean()))
    return out


def test_the_profile_equals_the_cache(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    df = sink_profile(tiny_model, tiny_tokens, batch_size=2, progress=False)  # three batches, folded
    ref = _reference(tiny_model, tiny_tokens)
    np.testing.assert_allclose(df["sink_attention"], ref["sink"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(df["sink_attention_sem"], ref["sink_sem"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(df["sink_heads_share"], ref["share"])
    np.testing.assert_allclose(df["max_abs_activation"], ref["peak"], rtol=1e-5)
    assert df["max_position"].tolist() == ref["pos"] and df["max_dimension"].tolist() == ref["dim"]
    # the median of an even number of entries: torch takes the lower middle one, in both
    np.testing.assert_allclose(df["median_abs_activation"], ref["median"], rtol=1e-5)
    np.testing.assert_allclose(df["massive_ratio"], np.array(ref["peak"]) / np.array(ref["median"]), rtol=1e-5)
    np.testing.assert_allclose(df["resid_norm"], ref["norm"], rtol=1e-5)
    np.testing.assert_allclose(df["bos_resid_norm"], ref["bos"], rtol=1e-5)
    assert df.attrs["provenance"]["settings"]["analysis"] == "sink_profile"


def test_bf16_profile_is_close(tiny_tokens: torch.Tensor) -> None:
    from tests.conftest import make_tiny_model

    model = make_tiny_model("llama")
    exact = sink_profile(model, tiny_tokens, progress=False)
    low = sink_profile(model, tiny_tokens, progress=False, precision="bf16")
    np.testing.assert_allclose(low["sink_attention"], exact["sink_attention"], atol=0.01)
    np.testing.assert_allclose(low["resid_norm"], exact["resid_norm"], rtol=0.02)


def test_bad_input(tiny_model: HookedTransformer) -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive number of sequences"):
        sink_profile(tiny_model, torch.zeros(2, 6, dtype=torch.long), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        sink_profile(tiny_model, torch.zeros(2, 1, dtype=torch.long), progress=False)


def test_the_figure_draws_every_panel(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    df = sink_profile(tiny_model, tiny_tokens, progress=False)
    fig = plots.sink_profile([df, df.assign(sink_attention=df["sink_attention"] / 2)])
    axes = {trace.yaxis for trace in fig.data}
    assert axes == {"y", "y2", "y3"}  # three panels, each with data
    assert fig.layout.yaxis2.type == "log" and fig.layout.xaxis3.title.text == plots.BLOCK_DEPTH


@pytest.mark.real
def test_the_real_model_has_a_sink_and_massive_activations(real_model: HookedTransformer, real_tokens: torch.Tensor) -> None:
    """SmolLM2-135M: after its first blocks most heads attend to the first token, and one residual
    feature (on the first token) is hundreds of times the median, as Gu et al. and Sun et al. find."""
    df = sink_profile(real_model, real_tokens[:2], progress=False)
    late = df[df["relative_depth"] > 0.2]
    assert late["sink_attention"].median() > 0.5
    assert df["massive_ratio"].max() > 100
    assert int(df.loc[df["massive_ratio"].idxmax(), "max_position"]) == 0


def test_stage_signals_put_each_boundary_beside_the_rule() -> None:
    import pandas as pd

    from stages_of_inference.stages.placement import AGREEMENT, stage_signals

    stages = pd.DataFrame({"stage": ["detokenization", "feature engineering", "prediction ensembling",
                                     "residual sharpening"], "first_layer": [0, 3, 10, 19], "n_blocks": [3, 7, 9, 2]})
    sinks = pd.DataFrame({"layer": range(21), "massive_ratio": [2.0] * 21, "sink_heads_share": [0.0] * 10 + [0.6] * 11})
    depth = pd.DataFrame({"convention": ["paper", "per_layer_norm"], "median_depth": [5, 21]})
    out = stage_signals(stages, sinks, depth)
    assert out["boundary"].tolist() == ["feature engineering", "prediction ensembling", "residual sharpening"]
    assert out["layer"].tolist() == [-1, 10, 20]  # massive activations never switch on; depth 21 = after block 20
    assert out["rule_layer"].tolist() == [3, 10, 19]
    assert out["agrees"].tolist() == [False, True, abs(20 / 20 - 19 / 20) <= AGREEMENT]
    assert stage_signals(stages, None, depth)["signal"].tolist() == ["half the predictions have settled"]
