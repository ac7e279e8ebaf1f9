"""Stage 3, prediction ensembling: neuron moments, kinds, token-class neurons, ensemble probes."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer

from stages_of_inference.stages import prediction_ensembling as pe

N_LAYERS, D_MLP, D_VOCAB = 4, 48, 101  # the tiny models (conftest.tiny_config)
ING = [i for i in range(D_VOCAB) if i % 6 == 1]  # tokens "ending in -ing" in the tiny vocabulary
WORDS = [f" w{i}ing" if i in ING else f" w{i}" for i in range(D_VOCAB)]


def dense_moments(model: HookedTransformer) -> pd.DataFrame:
    """The definition, all at once in float64: the full [layer, neuron, vocab] cosine tensor."""
    w_u = model.W_U.detach().double()
    w_u = w_u - w_u.mean(dim=1, keepdim=True)
    w_u = w_u / w_u.norm(dim=0, keepdim=True)
    w_out = model.W_out.detach().double()  # [layer, neuron, d_model]
    w_out = w_out / w_out.norm(dim=-1, keepdim=True)
    cos = torch.einsum("lnd,dv->lnv", w_out, w_u)
    mean = cos.mean(-1)
    std = cos.std(-1, unbiased=False)
    z = (cos - mean[..., None]) / std[..., None]
    return pd.DataFrame({
        "layer": np.repeat(np.arange(cos.shape[0]), cos.shape[1]),
        "neuron": np.tile(np.arange(cos.shape[1]), cos.shape[0]),
        "vocab_mean": mean.flatten().numpy(),
        "vocab_var": (std**2).flatten().numpy(),
        "vocab_skew": (z**3).mean(-1).flatten().numpy(),
        "vocab_kurt": (z**4).mean(-1).flatten().numpy(),
    })


def isolate_token(model: HookedTransformer, token: int) -> torch.Tensor:
    """Make ``token``'s (centred) unembedding orthogonal to every other token's, in place; return it.

    A 101-token vocabulary in 32 dimensions leaves random columns with cosines of about 0.2 to any
    direction, which caps a one-token neuron's kurtosis below 10; real vocabularies (tens of
    thousands of tokens) do not have that problem. Isolating one token restores a clean outlier.
    """
    with torch.no_grad():
        w_u = model.unembed.W_U
        w_u -= w_u.mean(dim=1, keepdim=True)
        u = w_u[:, token].clone()
        unit = u / u.norm()
        others = [i for i in range(w_u.shape[1]) if i != token]
        w_u[:, others] -= torch.outer(unit, unit @ w_u[:, others])
    return u


def test_moments_equal_dense_computation(tiny_model: HookedTransformer) -> None:
    got = pe.neuron_moments(tiny_model, progress=False)
    want = dense_moments(tiny_model)
    assert list(got.columns) == list(pe.MOMENT_COLUMNS)
    assert len(got) == N_LAYERS * D_MLP
    assert (got["layer"].to_numpy() == want["layer"].to_numpy()).all()
    assert (got["neuron"].to_numpy() == want["neuron"].to_numpy()).all()
    for col in ("vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt"):
        np.testing.assert_allclose(got[col], want[col], rtol=1e-4, atol=1e-6, err_msg=col)
    # the kurtosis is not excess: random directions give about 3
    assert 2.0 < got["vocab_kurt"].median() < 4.0
    # chunking does not change anything
    small = pe.neuron_moments(tiny_model, chunk_neurons=7, progress=False)
    np.testing.assert_allclose(small["vocab_kurt"], got["vocab_kurt"], rtol=1e-5)
    assert got.attrs["provenance"]["settings"]["analysis"] == "neuron_moments"


def test_moments_centre_the_unembedding(tiny_model: HookedTransformer) -> None:
    """A model loaded without center_unembed (W_U plus one vector added to every token's column)
    gives the same moments: W_U is centred over the vocabulary before the cosines."""
    shifted = copy.deepcopy(tiny_model)
    with torch.no_grad():
        shifted.unembed.W_U += 2.0 * torch.randn(shifted.cfg.d_model, 1, generator=torch.Generator().manual_seed(3))
    got = pe.neuron_moments(shifted, layers=[0], progress=False)
    want = pe.neuron_moments(tiny_model, layers=[0], progress=False)
    np.testing.assert_allclose(got["vocab_kurt"], want["vocab_kurt"], rtol=1e-4)
    np.testing.assert_allclose(got["vocab_mean"], want["vocab_mean"], atol=1e-6)


def test_moments_of_selected_layers(tiny_model: HookedTransformer) -> None:
    full = pe.neuron_moments(tiny_model, progress=False)
    part = pe.neuron_moments(tiny_model, layers=[3, 1], progress=False)
    assert part["layer"].unique().tolist() == [3, 1]
    merged = part.merge(full, on=["layer", "neuron"], suffixes=("", "_full"))
    np.testing.assert_allclose(merged["vocab_kurt"], merged["vocab_kurt_full"], rtol=1e-6)


def test_planted_neurons_are_classified(tiny_model: HookedTransformer) -> None:
    model = copy.deepcopy(tiny_model)
    token, layer = 17, 2
    u = isolate_token(model, token)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w_out = model.blocks[layer].mlp.W_out
        w_out[0] = 3.0 * u
        w_out[1] = -0.5 * u
        w_out[2] = torch.randn(w_out.shape[1], generator=gen)
    df = pe.neuron_moments(model, progress=False).set_index(["layer", "neuron"])
    assert df.loc[(layer, 0), "kind"] == "prediction"
    assert df.loc[(layer, 0), "vocab_kurt"] > 50  # one clean outlier among 101 tokens
    assert df.loc[(layer, 1), "kind"] == "suppression"
    assert df.loc[(layer, 2), "kind"] == "other"
    # the kinds follow the threshold rule exactly
    heavy = df["vocab_kurt"] > 10
    assert (df["kind"] == "prediction").equals(heavy & (df["vocab_skew"] > 0))
    assert (df["kind"] == "suppression").equals(heavy & (df["vocab_skew"] < 0))
    # the session fixture was not touched
    assert not torch.equal(tiny_model.blocks[layer].mlp.W_out[0], model.blocks[layer].mlp.W_out[0])
    # a threshold above the planted kurtosis makes them "other"
    strict = pe.neuron_moments(model, kurtosis_threshold=1e6, layers=[layer], progress=False)
    assert set(strict["kind"]) == {"other"}


def test_zero_neuron_is_other(tiny_model: HookedTransformer) -> None:
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.blocks[0].mlp.W_out[5] = 0
    row = pe.neuron_moments(model, layers=[0], progress=False).iloc[5]
    assert row["vocab_var"] == 0 and np.isnan(row["vocab_kurt"]) and row["kind"] == "other"


def test_neuron_counts(tiny_model: HookedTransformer) -> None:
    model = copy.deepcopy(tiny_model)
    u = isolate_token(model, 40)
    with torch.no_grad():
        model.blocks[3].mlp.W_out[[4, 9]] = u
        model.blocks[3].mlp.W_out[11] = -u
        model.blocks[1].mlp.W_out[0] = -u
    counts = pe.neuron_counts(pe.neuron_moments(model, progress=False))
    assert counts["layer"].tolist() == [0, 1, 2, 3]
    assert counts["relative_depth"].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert counts["n_prediction"].tolist() == [0, 0, 0, 2]
    assert counts["n_suppression"].tolist() == [0, 1, 0, 1]
    assert (counts["n_neurons"] == D_MLP).all()
    assert (counts["n_prediction"] + counts["n_suppression"] + counts["n_other"] == counts["n_neurons"]).all()
    assert counts["share_suppression"].iloc[1] == pytest.approx(1 / D_MLP)
    with pytest.raises(ValueError, match="lacks the columns"):
        pe.neuron_counts(pd.DataFrame({"layer": [0]}))


def plant_class_neuron(model: HookedTransformer, layer: int, neuron: int, sign: float) -> None:
    """Make one neuron write toward (sign > 0) or away from the "-ing" tokens, in place."""
    with torch.no_grad():
        has = torch.zeros(D_VOCAB, dtype=torch.bool)
        has[ING] = True
        w_u = model.W_U
        direction = w_u[:, has].mean(1) - w_u[:, ~has].mean(1)
        w_out = model.blocks[layer].mlp.W_out
        w_out[neuron] = sign * direction / direction.norm() * w_out.norm(dim=1).max()


def test_token_class_neurons_find_planted_neuron(tiny_model: HookedTransformer) -> None:
    model = copy.deepcopy(tiny_model)
    plant_class_neuron(model, layer=2, neuron=13, sign=1.0)
    top = pe.token_class_neurons(model, "ends_with_ing", top=5, vocab=WORDS)
    assert list(top.columns) == ["rank", "layer", "neuron", "relative_depth", "score", "abs_score",
                                 "vocab_skew", "vocab_kurt", "kind"]
    assert (top.iloc[0]["layer"], top.iloc[0]["neuron"]) == (2, 13)
    assert top.iloc[0]["score"] > 0
    assert top["abs_score"].is_monotonic_decreasing and top["rank"].tolist() == [1, 2, 3, 4, 5]
    # the score is the difference of means of the direct logit effect W_U^T w_out
    effect = model.blocks[2].mlp.W_out[13].detach() @ model.W_U.detach()
    has = torch.zeros(D_VOCAB, dtype=torch.bool)
    has[ING] = True
    assert top.iloc[0]["score"] == pytest.approx(float(effect[has].mean() - effect[~has].mean()), rel=1e-4)
    # the same class given as a function, a bool mask, or a string -> id mapping
    as_fn = pe.token_class_neurons(model, lambda s: s.endswith("ing"), top=5, vocab=WORDS)
    as_mask = pe.token_class_neurons(model, has, top=5)
    as_map = pe.token_class_neurons(model, pe.ends_with("ing"), top=5, vocab={w: i for i, w in enumerate(WORDS)})
    for other in (as_fn, as_mask, as_map):
        assert other[["layer", "neuron"]].equals(top[["layer", "neuron"]])
    # the negated neuron is found too, pushing the class down
    neg = copy.deepcopy(tiny_model)
    plant_class_neuron(neg, layer=3, neuron=7, sign=-1.0)
    top = pe.token_class_neurons(neg, "ends_with_ing", top=1, vocab=WORDS)
    assert (top.iloc[0]["layer"], top.iloc[0]["neuron"]) == (3, 7) and top.iloc[0]["score"] < 0


def test_token_class_neurons_errors(tiny_model: HookedTransformer) -> None:
    with pytest.raises(ValueError, match="no tokenizer"):
        pe.token_class_neurons(tiny_model, "ends_with_ing")
    with pytest.raises(ValueError, match="unknown predicate"):
        pe.token_class_neurons(tiny_model, "ends_with_xyz", vocab=WORDS)
    with pytest.raises(ValueError, match="need at least one token with the property"):
        pe.token_class_neurons(tiny_model, "digits", vocab=WORDS)
    with pytest.raises(ValueError, match="out of range"):
        pe.token_class_neurons(tiny_model, "ends_with_ing", vocab=WORDS, layers=[4])


def test_builtin_predicates() -> None:
    p = pe.PREDICATES
    assert p["ends_with_ing"](" Running") and not p["ends_with_ing"](" ring!")
    assert p["capitalised"](" Emma") and not p["capitalised"](" emma") and not p["capitalised"]("  ")
    assert p["digits"]("1811") and not p["digits"](" 18th") and not p["digits"]("")
    assert p["punctuation"](" ;") and p["punctuation"]("\u201d.") and not p["punctuation"](" a.")
    with pytest.raises(ValueError):
        pe.ends_with("")


def test_neuron_activations_match_cache(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    neurons = [(2, 5), (0, 1), (2, 0)]
    acts = pe.neuron_activations(tiny_model, tiny_tokens, neurons, batch_size=2, progress=False)
    _, cache = tiny_model.run_with_cache(tiny_tokens)
    for column, (layer, neuron) in enumerate(neurons):
        torch.testing.assert_close(acts[..., column], cache[f"blocks.{layer}.mlp.hook_post"][..., neuron])


def test_ensemble_probe_beats_single_neurons(tiny_model: HookedTransformer) -> None:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(1, D_VOCAB, (40, 24), generator=gen)
    tokens[:, 0] = 0
    neurons = [(1, 3), (1, 20), (2, 8), (3, 30)]
    _, cache = tiny_model.run_with_cache(tokens)
    acts = torch.stack([cache[f"blocks.{l}.mlp.hook_post"][..., j] for l, j in neurons], dim=-1)
    z = (acts - acts.mean((0, 1))) / acts.std((0, 1))
    score = z.sum(-1)  # the label is a sum of the four neurons' activations
    label = score > score[:, 1:-1].median()
    df = pe.neuron_ensemble_probe(tiny_model, tokens, neurons, label, progress=False)
    assert df["probe"].tolist() == ["neuron"] * 4 + ["ensemble"]
    assert df["layer"].iloc[:4].tolist() == [1, 1, 2, 3] and pd.isna(df["layer"].iloc[4])
    singles = df[df["probe"] == "neuron"]
    ensemble = df[df["probe"] == "ensemble"].iloc[0]
    assert ensemble["n_features"] == 4
    assert ensemble["accuracy"] >= 0.9
    assert ensemble["accuracy"] > singles["accuracy"].max() + 0.1
    assert (df["baseline"] < 0.65).all()  # balanced classes: nothing to gain by guessing


def test_probe_label_from_predicate(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    has = torch.zeros(D_VOCAB, dtype=torch.bool)
    has[ING] = True
    labels = pe._labels_from(tiny_model, tiny_tokens, "ends_with_ing", WORDS)
    assert torch.equal(labels[:, :-1], has[tiny_tokens[:, 1:]])  # position p: is token p + 1 an -ing token?
    df = pe.neuron_ensemble_probe(tiny_model, tiny_tokens, [(3, 0), (3, 1)], "ends_with_ing", vocab=WORDS,
                                  progress=False)
    assert len(df) == 3 and df["accuracy"].between(0, 1).all()


def test_probe_balance(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    """balance=True probes an equal number of positions per class: the baseline becomes chance."""
    label = torch.zeros_like(tiny_tokens, dtype=torch.bool)
    label[:, 1::5] = True  # 1 in 5 positions
    plain = pe.neuron_ensemble_probe(tiny_model, tiny_tokens, [(1, 2)], label, progress=False)
    balanced = pe.neuron_ensemble_probe(tiny_model, tiny_tokens, [(1, 2)], label, balance=True, progress=False)
    n_pos = int(label[:, 1:-1].sum())
    assert balanced.attrs["provenance"]["settings"]["n_positions"] == 2 * n_pos
    assert plain.attrs["provenance"]["settings"]["n_positions"] == label[:, 1:-1].numel()
    assert plain["baseline"].iloc[0] > 0.7 and balanced["baseline"].iloc[0] < 0.7
    assert (balanced["n_train"] + balanced["n_test"] == 2 * n_pos).all()


def test_probe_errors(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    label = torch.zeros_like(tiny_tokens, dtype=torch.bool)
    with pytest.raises(ValueError, match="all one class"):
        pe.neuron_ensemble_probe(tiny_model, tiny_tokens, [(0, 0)], label, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        pe.neuron_ensemble_probe(tiny_model, tiny_tokens, [(0, D_MLP)], label, progress=False)
    with pytest.raises(ValueError, match="must not repeat"):
        pe.neuron_ensemble_probe(tiny_model, tiny_tokens, [(0, 1), (0, 1)], label, progress=False)
    with pytest.raises(ValueError, match="shape"):
        pe.neuron_ensemble_probe(tiny_model, tiny_tokens, [(0, 1)], label[:, :5], progress=False)


def test_robustness_by_region() -> None:
    depth = [i / 9 for i in range(10)]
    kl = [8.0, 0.5, 0.3, 0.2, 0.1, 0.1, 0.2, 0.4, 0.6, 2.0]
    summary = pd.DataFrame({
        "kind": ["none"] + ["drop"] * 10 + ["swap"] * 9,
        "layer": [-1] + list(range(10)) + list(range(9)),
        "relative_depth": [np.nan] + depth + depth[:9],
        "kl_nats": [0.0] + kl + [k / 2 for k in kl[:9]],
        "loss_delta": [0.0] + kl + kl[:9],
        "relative_accuracy": [1.0] + [1 - k / 10 for k in kl] + [1.0] * 9,
        "top1_agreement": [1.0] * 20,
    })
    out = pe.robustness_by_region(summary)
    drop = out[out["kind"] == "drop"].set_index("region")
    assert list(drop.index) == ["first", "early", "middle", "late", "last"]
    assert drop.loc["first", "layers"] == "0" and drop.loc["last", "layers"] == "9"
    assert drop.loc["early", "layers"] == "1,2" and drop.loc["middle", "layers"] == "3,4,5"
    assert drop.loc["late", "layers"] == "6,7,8"
    assert drop.loc["middle", "mean_kl_nats"] == pytest.approx(0.4 / 3)
    assert drop.loc["last", "min_relative_accuracy"] == pytest.approx(0.8)
    swap = out[out["kind"] == "swap"].set_index("region")
    assert swap.loc["last", "layers"] == "8"  # the last swap is blocks 8 <-> 9

    class Sweep:  # anything with a .summary works
        pass

    sweep = Sweep()
    sweep.summary = summary
    assert pe.robustness_by_region(sweep).equals(out)
    with pytest.raises(ValueError, match="cuts"):
        pe.robustness_by_region(summary, cuts=(0.7, 0.3))
    with pytest.raises(ValueError, match="lacks the columns"):
        pe.robustness_by_region(summary.drop(columns="kl_nats"))


# ------------------------------------------------------------------------------- real model


@pytest.mark.real
def test_real_model_suppression_neurons_crowd_the_last_block(real_model: HookedTransformer) -> None:
    n = real_model.cfg.n_layers
    first_half = list(range(n // 2))
    moments = pe.neuron_moments(real_model, layers=first_half + [n - 1], progress=False)
    counts = pe.neuron_counts(moments).set_index("layer")
    assert counts.index.tolist() == first_half + [n - 1]
    assert (counts["n_neurons"] == real_model.cfg.d_mlp).all()
    last = counts.loc[n - 1]
    early = counts.loc[first_half]
    # measured on SmolLM2-135M: 65 suppression and 54 prediction neurons in block 29, and
    # (almost) none in the first half
    assert last["n_suppression"] > early["n_suppression"].max()
    assert last["n_suppression"] >= 20 and last["n_prediction"] >= 20
    assert early["n_suppression"].sum() + early["n_prediction"].sum() <= 10
