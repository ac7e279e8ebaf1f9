"""Stage 2: logit-lens trajectory, layer similarity (CKA, cosine) and layer probes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import tl_lens_stack

from stages_of_inference.metrics import mean_and_sem, sequence_metrics
from stages_of_inference.stages.feature_engineering import (
    continues_word,
    layer_similarity,
    linear_cka,
    logit_lens,
    next_starts_word,
    probe_layers,
    unbiased_hsic,
)

LENS_COLUMNS = ["entropy_bits", "kl_to_final_nats", "accuracy", "agreement_with_final", "confidence", "loss"]


# ---------------------------------------------------------------------------------------------
# logit lens


@pytest.mark.parametrize("convention", ["paper", "per_layer_norm"])
def test_logit_lens_equals_metrics_of_the_transformer_lens_stack(tiny_model, tiny_tokens, convention):
    n = tiny_model.cfg.n_layers
    stack = tl_lens_stack(tiny_model, tiny_tokens, convention)
    df = logit_lens(tiny_model, tiny_tokens, convention=convention, batch_size=2, chunk_tokens=13, progress=False)
    assert list(df["layer"]) == list(range(n + 1))
    assert df["relative_depth"].tolist() == pytest.approx([k / n for k in range(n + 1)])
    assert (df["n_tokens"] == tiny_tokens.shape[0] * (tiny_tokens.shape[1] - 2)).all()
    for k in range(n + 1):
        m = sequence_metrics(stack[k], tiny_tokens, ref_logits=stack[n])
        expected = {
            "entropy_bits": m["entropy_bits"], "kl_to_final_nats": m["kl_nats"], "accuracy": m["correct"],
            "agreement_with_final": m["agree"], "confidence": m["confidence"], "loss": m["loss"],
        }
        for col in LENS_COLUMNS:
            mean, sem = mean_and_sem(expected[col])
            assert df.loc[k, col] == pytest.approx(mean, rel=1e-4, abs=1e-5), (k, col)
            assert df.loc[k, f"{col}_sem"] == pytest.approx(sem, rel=1e-3, abs=1e-5), (k, col)
    assert df["kl_to_final_nats"].iloc[-1] == pytest.approx(0.0, abs=1e-6)
    assert df["agreement_with_final"].iloc[-1] == 1.0
    assert df.attrs["provenance"]["settings"]["convention"] == convention


def test_logit_lens_of_a_soft_capped_model(tiny_tokens):
    """With an output soft-cap the lens logits are not linear in the readout; the lens then takes
    its exact-reference path (stored final log-probabilities), and still equals the direct
    computation on the soft-capped TransformerLens stack."""
    from conftest import make_tiny_model

    model = make_tiny_model("gpt2")
    n = model.cfg.n_layers
    with torch.no_grad():
        _, cache = model.run_with_cache(tiny_tokens)
        stack = cache.apply_ln_to_stack(cache.accumulated_resid(), layer=n, recompute_ln=False) @ model.W_U
    plain = logit_lens(model, tiny_tokens, progress=False)
    model.cfg.output_logits_soft_cap = 2.0
    try:
        capped = logit_lens(model, tiny_tokens, progress=False)
    finally:
        model.cfg.output_logits_soft_cap = -1.0
    stack = 2.0 * torch.tanh(stack / 2.0)
    for k in range(n + 1):
        m = sequence_metrics(stack[k], tiny_tokens, ref_logits=stack[n])
        assert capped.loc[k, "kl_to_final_nats"] == pytest.approx(float(m["kl_nats"].double().mean()), rel=1e-4, abs=1e-6)
        assert capped.loc[k, "entropy_bits"] == pytest.approx(float(m["entropy_bits"].double().mean()), rel=1e-5)
    assert (capped["entropy_bits"] - plain["entropy_bits"]).abs().max() > 0.1  # the cap mattered


@pytest.mark.parametrize("convention", ["paper", "per_layer_norm"])
def test_logit_lens_last_row_is_the_model_output(tiny_model, tiny_tokens, convention):
    """The last readout is the model's own output distribution when the model has no b_U
    (the tiny llama); with a b_U (tiny gpt2 / parallel, after folding) it is the output minus b_U."""
    with torch.no_grad():
        logits = tiny_model(tiny_tokens)
    b_U = tiny_model.b_U.detach()
    has_bias = bool(b_U.abs().max() > 0)
    assert has_bias == (tiny_model.cfg.normalization_type != "RMSPre")  # the fixtures are as documented
    reference = logits - b_U if has_bias else logits
    m = sequence_metrics(reference, tiny_tokens)
    last = logit_lens(tiny_model, tiny_tokens, convention=convention, progress=False).iloc[-1]
    assert last["entropy_bits"] == pytest.approx(float(m["entropy_bits"].mean()), rel=1e-5)
    assert last["accuracy"] == pytest.approx(float(m["correct"].double().mean()))
    assert last["confidence"] == pytest.approx(float(m["confidence"].mean()), rel=1e-5)
    if has_bias:  # and the bias matters: the lens is not the biased output
        biased = sequence_metrics(logits, tiny_tokens)
        assert abs(last["entropy_bits"] - float(biased["entropy_bits"].mean())) > 1e-3


def test_logit_lens_does_not_depend_on_batching(tiny_models, tiny_tokens):
    model = tiny_models["parallel"]
    a = logit_lens(model, tiny_tokens, batch_size=5, chunk_tokens=512, progress=False)
    b = logit_lens(model, tiny_tokens, batch_size=1, chunk_tokens=5, progress=False)
    cols = [c for c in a.columns if c not in ("convention",)]
    torch.testing.assert_close(torch.tensor(a[cols].to_numpy(float)), torch.tensor(b[cols].to_numpy(float)),
                               rtol=1e-5, atol=1e-6)


def test_logit_lens_refuses_bad_input(tiny_models, tiny_tokens):
    model = tiny_models["gpt2"]
    with pytest.raises(ValueError, match="convention"):
        logit_lens(model, tiny_tokens, convention="tuned", progress=False)
    with pytest.raises(ValueError, match="at least 3 positions"):
        logit_lens(model, tiny_tokens[:, :2], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        logit_lens(model, tiny_tokens, batch_size=0, progress=False)


# ---------------------------------------------------------------------------------------------
# CKA


def _hsic_u_statistic(k: torch.Tensor, l: torch.Tensor) -> float:
    """HSIC as the U-statistic over distinct index tuples (Song et al. 2012), by brute force."""
    n = k.shape[0]
    t1 = sum(k[i, j] * l[i, j] for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    t2 = sum(k[i, j] * l[q, r] for i, j, q, r in itertools.permutations(range(n), 4)) / (n * (n - 1) * (n - 2) * (n - 3))
    t3 = sum(k[i, j] * l[i, q] for i, j, q in itertools.permutations(range(n), 3)) / (n * (n - 1) * (n - 2))
    return float(t1 + t2 - 2 * t3)


def _hsic_direct(k: torch.Tensor, l: torch.Tensor) -> float:
    """The closed form, written out with explicit loops over the n x n entries."""
    n = k.shape[0]
    kt = [[0.0 if i == j else float(k[i, j]) for j in range(n)] for i in range(n)]
    lt = [[0.0 if i == j else float(l[i, j]) for j in range(n)] for i in range(n)]
    trace = sum(kt[i][j] * lt[j][i] for i in range(n) for j in range(n))
    ksum = sum(map(sum, kt))
    lsum = sum(map(sum, lt))
    cross = sum(sum(kt[i]) * sum(lt[i]) for i in range(n))
    return (trace + ksum * lsum / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


def test_unbiased_hsic_matches_direct_implementations():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 5, generator=g, dtype=torch.float64) + x[:, :1]
    k, l = x @ x.T, y @ y.T
    got = float(unbiased_hsic(k, l))
    assert got == pytest.approx(_hsic_u_statistic(k, l), rel=1e-9, abs=1e-12)
    big_x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    big_y = torch.randn(40, 9, generator=g, dtype=torch.float64)
    k, l = big_x @ big_x.T, big_y @ big_y.T
    assert float(unbiased_hsic(k, l)) == pytest.approx(_hsic_direct(k, l), rel=1e-9, abs=1e-12)
    # batched: one value per sequence
    stacked = unbiased_hsic(torch.stack([k, l]), torch.stack([l, l]))
    assert stacked.shape == (2,)
    assert float(stacked[0]) == pytest.approx(_hsic_direct(k, l), rel=1e-9)


def test_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 6, generator=g)) + 0.5 * torch.randn(3, 20, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)
    assert linear_cka(x @ q, y) == pytest.approx(linear_cka(x, y), rel=1e-6)
    assert linear_cka(7.5 * x, y) == pytest.approx(linear_cka(x, y), rel=1e-6)
    assert linear_cka(x + 3.0, y) == pytest.approx(linear_cka(x, y), rel=1e-6)  # unbiased HSIC: no centring needed
    unrelated = torch.randn(3, 20, 6, generator=g)
    assert abs(linear_cka(x, unrelated)) < linear_cka(x, y)
    # HSIC is summed over sequences before the ratio: not the mean of per-sequence CKAs
    per_seq = sum(linear_cka(x[i : i + 1], y[i : i + 1]) for i in range(3)) / 3
    kx, ky = x.double() @ x.double().transpose(1, 2), y.double() @ y.double().transpose(1, 2)
    pooled = unbiased_hsic(kx, ky).sum() / torch.sqrt(unbiased_hsic(kx, kx).sum() * unbiased_hsic(ky, ky).sum())
    assert linear_cka(x, y) == pytest.approx(float(pooled), rel=1e-9)
    assert abs(per_seq - float(pooled)) > 1e-6


def test_layer_similarity_cka_equals_direct_computation(tiny_model, tiny_tokens):
    n = tiny_model.cfg.n_layers
    df = layer_similarity(tiny_model, tiny_tokens, method="cka", batch_size=2, progress=False)
    assert len(df) == n * n
    mat = df.pivot(index="layer_a", columns="layer_b", values="similarity").to_numpy()
    _, cache = tiny_model.run_with_cache(tiny_tokens)
    resid = [cache[f"blocks.{i}.hook_resid_post"][:, 1:] for i in range(n)]
    for i in range(n):
        assert mat[i, i] == pytest.approx(1.0, abs=1e-9)
        for j in range(n):
            assert mat[i, j] == pytest.approx(mat[j, i], rel=1e-9)
            assert mat[i, j] == pytest.approx(linear_cka(resid[i], resid[j]), rel=1e-6, abs=1e-9)
    assert df["relative_depth_b"].max() == 1.0


def test_layer_similarity_cosine_equals_direct_computation(tiny_model, tiny_tokens):
    n = tiny_model.cfg.n_layers
    df = layer_similarity(tiny_model, tiny_tokens, method="cosine", batch_size=3, progress=False)
    mat = df.pivot(index="layer_a", columns="layer_b", values="similarity").to_numpy()
    _, cache = tiny_model.run_with_cache(tiny_tokens)
    resid = [cache[f"blocks.{i}.hook_resid_post"][:, 1:] for i in range(n)]
    for i in range(n):
        for j in range(n):
            direct = torch.nn.functional.cosine_similarity(resid[i], resid[j], dim=-1).mean()
            assert mat[i, j] == pytest.approx(float(direct), rel=1e-5, abs=1e-6)


def test_layer_similarity_refuses_bad_input(tiny_models, tiny_tokens):
    with pytest.raises(ValueError, match="method"):
        layer_similarity(tiny_models["gpt2"], tiny_tokens, method="svcca", progress=False)
    with pytest.raises(ValueError, match="positions"):
        layer_similarity(tiny_models["gpt2"], tiny_tokens[:, :4], progress=False)


# ---------------------------------------------------------------------------------------------
# probes and labels


def test_probe_finds_a_linear_label_where_it_lives(tiny_models):
    model = tiny_models["llama"]
    tokens = torch.randint(1, 101, (24, 24), generator=torch.Generator().manual_seed(5))
    tokens[:, 0] = 0
    _, cache = model.run_with_cache(tokens)
    resid = cache["blocks.1.hook_resid_post"]  # readout 2
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    score = resid @ direction
    labels = (score > score[:, 1:].median()).long()
    labels[:, 0] = -1
    df = probe_layers(model, tokens, labels, progress=False)
    assert list(df["layer"]) == list(range(model.cfg.n_layers + 1))
    assert df.loc[2, "accuracy"] > 0.9
    assert df.loc[2, "accuracy"] > df.loc[2, "baseline"] + 0.35
    assert (df["n_test"] == round(24 * 23 * 0.25)).all()
    shuffled = labels.clone()
    shuffled[:, 1:] = labels[:, 1:].flatten()[torch.randperm(24 * 23, generator=torch.Generator().manual_seed(1))].view(24, 23)
    df = probe_layers(model, tokens, shuffled, points=[2], progress=False)
    # balanced labels: chance is 0.5 and the majority baseline on the test rows is 0.5 +- noise
    assert abs(df.loc[0, "accuracy"] - 0.5) < 0.1
    assert df.loc[0, "accuracy"] < max(df.loc[0, "baseline"], 1 - df.loc[0, "baseline"]) + 0.1


def _word_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "Ġwalk", "ing", "Ġhome", ",", "Ġthe", "s", "Ċ", "▁sea", "Ġ,", "9"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<s>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def test_word_labels(tiny_models):
    import copy

    model = copy.copy(tiny_models["gpt2"])  # a shallow copy: the session fixture keeps its tokenizer
    model.tokenizer = _word_tokenizer()
    #                          <s> walk ing home ,  the  s  \n  sea  ,  9
    tokens = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 2, 10]])
    assert continues_word(model, tokens).tolist() == [[-1, 0, 1, 0, 0, 0, 1, 0, 0, 1, 1]]
    assert next_starts_word(model, tokens).tolist() == [[-1, 0, 1, 0, 1, 0, 0, 1, 0, 0, -1]]
    df = probe_layers(model, torch.randint(0, 11, (6, 20), generator=torch.Generator().manual_seed(0)),
                      "continues_word", progress=False)
    assert (df["label"] == "continues_word").all()


def test_labels_need_a_tokenizer_and_probe_input_is_checked(tiny_models, tiny_tokens):
    model = tiny_models["gpt2"]
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        continues_word(model, tiny_tokens)
    with pytest.raises(ValueError, match="no tokenizer"):
        probe_layers(model, tiny_tokens, "next_starts_word", progress=False)
    with pytest.raises(ValueError, match="unknown label maker"):
        probe_layers(model, tiny_tokens, "is_noun", progress=False)
    with pytest.raises(ValueError, match="two classes"):
        probe_layers(model, tiny_tokens, torch.zeros_like(tiny_tokens), progress=False)
    with pytest.raises((ValueError, TypeError)):  # jaxtyping's check in the test run, ours otherwise
        probe_layers(model, tiny_tokens, torch.zeros(3, 5, dtype=torch.long), progress=False)


def test_logit_lens_points_subset_equals_the_full_rows(tiny_models, tiny_tokens):
    model = tiny_models["llama"]
    full = logit_lens(model, tiny_tokens, progress=False)
    part = logit_lens(model, tiny_tokens, points=[3, 0], progress=False)
    assert part["layer"].tolist() == [0, 3]
    cols = ["relative_depth", *LENS_COLUMNS]
    torch.testing.assert_close(torch.tensor(part[cols].to_numpy(float)),
                               torch.tensor(full.loc[[0, 3], cols].to_numpy(float)))
    with pytest.raises(ValueError, match="out of range"):
        logit_lens(model, tiny_tokens, points=[99], progress=False)


def test_conventions_share_every_top1(tiny_model, tiny_tokens):
    """The conventions differ by a positive per-position factor (the final scale vs the readout's
    own), so they rank tokens alike: accuracy and agreement agree, entropies do not."""
    paper = logit_lens(tiny_model, tiny_tokens, "paper", progress=False)
    per_layer = logit_lens(tiny_model, tiny_tokens, "per_layer_norm", progress=False)
    assert paper["accuracy"].tolist() == per_layer["accuracy"].tolist()
    assert paper["agreement_with_final"].tolist() == per_layer["agreement_with_final"].tolist()
    assert (paper["entropy_bits"] - per_layer["entropy_bits"]).iloc[:-1].abs().max() > 0.01


# ---------------------------------------------------------------------------------------------
# the real embedded model (SmolLM2-135M, 30 blocks)


@pytest.mark.real
def test_real_logit_lens_paper_vs_per_layer_norm(real_model, real_tokens):
    n = real_model.cfg.n_layers
    points = [0, 6, 12, 15, 18, 24, n]
    tokens = real_tokens[:2]  # 252 scored positions; time goes into (points x tokens) unembeddings
    paper = logit_lens(real_model, tokens, "paper", points=points, progress=False).set_index("layer")
    per_layer = logit_lens(real_model, tokens, "per_layer_norm", points=points, progress=False).set_index("layer")
    out = paper.loc[n, "entropy_bits"]
    # the paper's convention: near-uniform at the embedding (log2 49152 = 15.6 bits), high through
    # the first half, far above the output's entropy (measured 15.6 / 14.9 / 13.7 / 13.1 vs 5.4)
    assert paper.loc[0, "entropy_bits"] > 15.0
    for k in (0, 6, 12, 15):
        assert paper.loc[k, "entropy_bits"] > out + 5.0, k
    # per-layer norm: every readout on the output's scale, sharp through the middle (measured
    # 1.2-1.6 bits), rising to the output's entropy at the end
    for k in (6, 12, 15, 18, 24):
        assert per_layer.loc[k, "entropy_bits"] < 3.0, k
        assert paper.loc[k, "entropy_bits"] - per_layer.loc[k, "entropy_bits"] > 3.0, k
    assert per_layer.loc[n, "entropy_bits"] == pytest.approx(out, rel=1e-5)
    assert per_layer.loc[n, "entropy_bits"] > per_layer.loc[15, "entropy_bits"] + 2.0
    # same top-1 everywhere; the output row is the model's own (no b_U)
    assert paper["accuracy"].tolist() == per_layer["accuracy"].tolist()
    assert float(real_model.b_U.detach().abs().max()) == 0.0
    assert paper.loc[n, "kl_to_final_nats"] == 0.0
    assert paper.loc[0, "kl_to_final_nats"] > paper.loc[24, "kl_to_final_nats"]


@pytest.mark.parametrize("method", ["cka", "cosine"])
def test_layer_similarity_outlier_tokens_are_left_out(tiny_models, tiny_tokens, method):
    model = tiny_models["gpt2"]
    n = model.cfg.n_layers
    ratio = 1.3  # low enough that the random tiny model has outliers
    df = layer_similarity(model, tiny_tokens, method=method, outlier_ratio=ratio, batch_size=2, progress=False)
    mat = df.pivot(index="layer_a", columns="layer_b", values="similarity").to_numpy()
    with torch.no_grad():
        _, cache = model.run_with_cache(tiny_tokens)
    resid = torch.stack([cache[f"blocks.{i}.hook_resid_post"][:, 1:] for i in range(n)]).double()
    norms = resid.norm(dim=-1)
    keep = ~(norms > ratio * norms.median(dim=-1, keepdim=True).values).any(0)  # [batch, pos - 1]
    excluded = int((~keep).sum())
    assert 0 < excluded < keep.numel() // 2
    assert df.attrs["provenance"]["settings"]["excluded_tokens"] == excluded
    seqs = [resid[:, b, keep[b]] for b in range(tiny_tokens.shape[0])]
    for i in range(n):
        for j in range(n):
            if method == "cka":
                hsic = lambda a, c: sum(float(unbiased_hsic(x[a] @ x[a].T, x[c] @ x[c].T)) for x in seqs)
                expected = hsic(i, j) / (hsic(i, i) * hsic(j, j)) ** 0.5
            else:
                expected = float(torch.cat([torch.nn.functional.cosine_similarity(x[i], x[j], dim=-1) for x in seqs]).mean())
            assert mat[i, j] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    plain = layer_similarity(model, tiny_tokens, method=method, progress=False)
    assert not np.allclose(plain["similarity"], df["similarity"])


@pytest.mark.parametrize("convention", ["paper", "per_layer_norm"])
def test_real_logit_lens_equals_float64(real_model, real_tokens, convention):
    """On the real model the lens' fp32 numbers equal a float64 computation of the same readouts
    to 2e-5 (KL in nats, loss, entropy in bits). Scoring through fp32 log_softmax, as the lens
    did before 2026-11-23, was off by 1.4e-4 (paper KL, embeddings) to 1.8e-3 (per-layer-norm KL
    of 107.65 nats, embeddings)."""
    from stages_of_inference.lens import iter_lens
    from tests.authors import authors_entropy_bits

    tokens = real_tokens[:2]
    points = [0, 15, real_model.cfg.n_layers]
    df = logit_lens(real_model, tokens, convention, points=points, progress=False).set_index("layer")
    w = real_model.W_U.detach().double()
    sums = {(p, key): 0.0 for p in points for key in ("entropy_bits", "kl_to_final_nats", "loss")}
    n = 0
    with torch.inference_mode():
        for chunk in iter_lens(real_model, tokens, convention, progress=False):
            ref = (chunk.readouts[-1].double() @ w).log_softmax(-1)
            n += chunk.targets.shape[0]
            for p in points:
                lp = (chunk.readouts[p].double() @ w).log_softmax(-1)
                sums[p, "entropy_bits"] += float(authors_entropy_bits(chunk.readouts[p].double() @ w).sum())
                sums[p, "kl_to_final_nats"] += float((ref.exp() * (ref - lp)).sum())
                sums[p, "loss"] += float(-lp.gather(-1, chunk.targets[:, None]).sum())
    for (p, key), total in sums.items():
        assert df.loc[p, key] == pytest.approx(total / n, abs=2e-5), (p, key)
