"""Prediction depth (feature_engineering.prediction_depth), against a literal computation from
TransformerLens' activation cache: every readout through the model's own final norm and W_U, the
top-1 at each, and for each token a backwards scan for the last readout that disagrees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

from stages_of_inference import plots
from stages_of_inference.stages import feature_engineering as fe


def _literal_depths(model: HookedTransformer, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(depth, right) per scored token, sequence-major, in the per_layer_norm convention."""
    n = model.cfg.n_layers
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        names = [f"blocks.{k}.hook_resid_pre" for k in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
        top1 = torch.stack([(model.ln_final(cache[name]) @ model.W_U).argmax(-1) for name in names])  # [k, b, pos]
    top1 = top1[:, :, 1:-1].reshape(n + 1, -1).numpy()  # scored positions 1 .. T-2
    targets = tokens[:, 2:].reshape(-1).numpy()
    depth = np.zeros(top1.shape[1], dtype=int)
    for t in range(top1.shape[1]):
        k = n
        while k > 0 and top1[k - 1, t] == top1[n, t]:
            k -= 1
        depth[t] = k
    return depth, top1[n] == targets


def test_prediction_depth_equals_the_literal_scan(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    dist, summary = fe.prediction_depth(tiny_model, tiny_tokens, convention="per_layer_norm", batch_size=2,
                                        chunk_tokens=7, progress=False)
    depth, right = _literal_depths(tiny_model, tiny_tokens)
    n = tiny_model.cfg.n_layers
    counts = np.bincount(depth, minlength=n + 1)
    np.testing.assert_allclose(dist["share"], counts / len(depth))
    with np.errstate(invalid="ignore"):  # a random model may get no token right: NaN shares, on both sides
        np.testing.assert_allclose(dist["share_right"], np.bincount(depth[right], minlength=n + 1) / right.sum())
        np.testing.assert_allclose(dist["share_wrong"], np.bincount(depth[~right], minlength=n + 1) / (~right).sum())
    row = summary.iloc[0]
    assert row["mean_depth"] == pytest.approx(depth.mean())
    mean = {k: depth[mask].mean() if mask.any() else float("nan") for k, mask in (("right", right), ("wrong", ~right))}
    assert row["mean_depth_right"] == pytest.approx(mean["right"], nan_ok=True)
    assert row["mean_depth_wrong"] == pytest.approx(mean["wrong"], nan_ok=True)
    assert row["median_depth"] == int(np.searchsorted(np.cumsum(counts) / len(depth), 0.5))
    assert row["n_tokens"] == len(depth) and row["n_right"] == int(right.sum())
    per_seq = depth.reshape(tiny_tokens.shape[0], -1).mean(axis=1)
    assert row["mean_depth_sem"] == pytest.approx(per_seq.std(ddof=1) / np.sqrt(len(per_seq)))


def test_one_pass_gives_the_lens_and_the_depth(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    lens, dist, summary = fe.lens_with_depth(tiny_model, tiny_tokens, convention="paper", progress=False)
    alone = fe.logit_lens(tiny_model, tiny_tokens, convention="paper", progress=False)
    cols = [c for c in alone.columns if c != "convention"]
    np.testing.assert_allclose(lens[cols].to_numpy(float), alone[cols].to_numpy(float), rtol=1e-12)
    d2, s2 = fe.prediction_depth(tiny_model, tiny_tokens, convention="paper", progress=False)
    np.testing.assert_allclose(dist["share"], d2["share"])
    assert summary.attrs["provenance"]["settings"]["analysis"] == "prediction_depth"


def test_both_conventions_give_the_same_depths_and_one_is_drawn(tiny_model: HookedTransformer,
                                                                 tiny_tokens: torch.Tensor) -> None:
    """The conventions scale each token's readout by different positive factors, which leaves every
    top-1 and so every depth unchanged; the figure draws one of them (three lines per model)."""
    import pandas as pd

    tables = [fe.prediction_depth(tiny_model, tiny_tokens, convention=c, progress=False)[0]
              for c in ("paper", "per_layer_norm")]
    np.testing.assert_array_equal(tables[0]["share"], tables[1]["share"])
    fig = plots.prediction_depth([pd.concat(tables, ignore_index=True), tables[0]])
    assert len(fig.data) == 6 and fig.layout.xaxis.title.text == plots.READOUT_DEPTH


@pytest.mark.real
def test_real_model_right_tokens_settle_earlier(real_model: HookedTransformer, real_tokens: torch.Tensor) -> None:
    """SmolLM2: predictions the model gets right settle at an earlier readout than wrong ones
    (Lioubashevski et al. find this on GPT-2 and Pythia)."""
    _, summary = fe.prediction_depth(real_model, real_tokens[:2], convention="per_layer_norm", progress=False)
    row = summary.iloc[0]
    assert row["mean_depth_right"] < row["mean_depth_wrong"]
    assert 0 < row["median_depth"] <= real_model.cfg.n_layers
