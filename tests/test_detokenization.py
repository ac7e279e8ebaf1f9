"""Stage 1: previous-token attention, subjoiner heads, first-block damage."""

from __future__ import annotations

import copy
import random

import numpy as np
import pandas as pd
import pytest
import torch

from stages_of_inference.stages.detokenization import (
    SubjoinerResult,
    first_blocks_damage,
    previous_token_attention,
    previous_token_attention_heads,
    subjoiner_heads,
)

# ---------------------------------------------------------------------------------------------
# previous-token attention


def _direct_previous_token(model, tokens, k):
    """The authors' way: the sub-diagonals d = 1..k of every full cached pattern, each entry
    weighted equally, mean over heads; per sequence, then mean and standard error over sequences."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    per_head = []
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double()  # [batch, head, query, key]
        entries = torch.cat([pattern.diagonal(offset=-d, dim1=-2, dim2=-1) for d in range(1, k + 1)], dim=-1)
        per_head.append(entries.mean(-1))  # [batch, head]
    return torch.stack(per_head, dim=1)  # [batch, layer, head]


@pytest.mark.parametrize("k", [1, 5])
def test_previous_token_attention_equals_cached_patterns(tiny_model, tiny_tokens, k):
    direct = _direct_previous_token(tiny_model, tiny_tokens, k)
    df = previous_token_attention(tiny_model, tiny_tokens, k=k, batch_size=2, progress=False)
    assert list(df.columns[:4]) == ["layer", "relative_depth", "mean_attention", "sem"]
    n = tiny_model.cfg.n_layers
    assert df["relative_depth"].tolist() == pytest.approx([i / (n - 1) for i in range(n)])
    per_seq = direct.mean(-1)  # [batch, layer]
    np.testing.assert_allclose(df["mean_attention"], per_seq.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(df["sem"], (per_seq.std(0) / per_seq.shape[0] ** 0.5).numpy(), rtol=1e-5)
    heads = previous_token_attention_heads(tiny_model, tiny_tokens, k=k, batch_size=3, progress=False)
    assert len(heads) == n * tiny_model.cfg.n_heads
    np.testing.assert_allclose(heads["mean_attention"], direct.mean(0).flatten().numpy(), rtol=1e-6)
    np.testing.assert_allclose(heads.groupby("layer")["mean_attention"].mean(), df["mean_attention"], rtol=1e-6)
    assert df.attrs["provenance"]["settings"]["k"] == k


def test_previous_token_attention_weights_entries_equally(tiny_models, tiny_tokens):
    """k = 5 pools the entries of all offsets (the offset-1 diagonal has the most entries), which
    differs from a mean of per-offset means."""
    model = tiny_models["gpt2"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tiny_tokens)
    pattern = cache["blocks.0.attn.hook_pattern"].double()
    per_offset = torch.stack([pattern.diagonal(offset=-d, dim1=-2, dim2=-1).mean() for d in range(1, 6)]).mean()
    df = previous_token_attention(model, tiny_tokens, k=5, progress=False)
    direct = _direct_previous_token(model, tiny_tokens, 5)[:, 0].mean()
    assert df.loc[0, "mean_attention"] == pytest.approx(float(direct), rel=1e-6)
    assert abs(df.loc[0, "mean_attention"] - float(per_offset)) > 1e-6


def test_previous_token_attention_refuses_bad_k(tiny_models, tiny_tokens):
    model = tiny_models["llama"]
    with pytest.raises(ValueError, match="k must lie in"):
        previous_token_attention(model, tiny_tokens, k=0, progress=False)
    with pytest.raises(ValueError, match="k must lie in"):
        previous_token_attention(model, tiny_tokens, k=tiny_tokens.shape[1], progress=False)


# ---------------------------------------------------------------------------------------------
# subjoiner heads on the tiny models, with a small BPE tokenizer

KNOWN_WORDS = ["the", "cat", "sat", "on", "mat", "a", "is"]


def _bpe_tokenizer():
    """Letters, "Ġ" + letter, and merges that make each known word one token; any other word of
    m letters splits into m tokens ("Ġx", "y", "z")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["<s>", "Ġ", *letters, *("Ġ" + c for c in letters)]
    merges = [("Ġ", c) for c in letters]
    for word in KNOWN_WORDS:
        piece = "Ġ" + word[0]
        for c in word[1:]:
            merges.append((piece, c))
            piece += c
            if piece not in vocab:
                vocab.append(piece)
    assert len(vocab) <= 101
    bpe = Tokenizer(models.BPE({w: i for i, w in enumerate(vocab)}, merges, unk_token="<s>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>")


def _text(n_words=600, seed=0):
    rng = random.Random(seed)
    words = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.6:
            words.append(rng.choice(KNOWN_WORDS))
        else:
            length = 3 if r < 0.8 else rng.choice([2, 4])
            words.append("".join(rng.choice("bcdfgkpqvwxz") for _ in range(length)))
    return " ".join(words)


@pytest.fixture(scope="module")
def tokenizer():
    return _bpe_tokenizer()


def _with_tokenizer(model, tokenizer):
    model = copy.copy(model)  # shallow: the session-wide fixture keeps no tokenizer
    model.tokenizer = tokenizer
    return model


def test_subjoiner_scores_equal_cached_patterns(tiny_model, tokenizer):
    model = _with_tokenizer(tiny_model, tokenizer)
    r = subjoiner_heads(model, [_text(seed=0), _text(seed=1)], n_pieces=3, n_context_words=4, min_prompts=5,
                        max_prompts=12, window=5, batch_size=5, progress=False)
    assert isinstance(r, SubjoinerResult)
    assert len(r.prompts) == 12 and len(r.control_prompts) == 12
    for text in r.prompts:
        words = text.split()
        assert len(words) == 5 and words[-1].isalpha() and words[-1].islower()
        assert len(tokenizer(" " + words[-1], add_special_tokens=False)["input_ids"]) == 3
    for text in r.control_prompts:
        assert len(tokenizer(" " + text.split()[-1], add_special_tokens=False)["input_ids"]) == 1

    def direct(texts):
        scores, patterns = [], 0
        for text in texts:  # one prompt at a time: no padding
            ids = torch.tensor([[0, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
            with torch.no_grad():
                _, cache = model.run_with_cache(ids)
            pat = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0] for l in range(model.cfg.n_layers)]).double()
            scores.append(pat[:, :, -1, -3:-1].sum(-1))  # last piece -> the two earlier pieces
            patterns = patterns + pat[:, :, -5:, -5:]
        return torch.stack(scores), patterns / len(texts)

    s, pat = direct(r.prompts)
    c, cpat = direct(r.control_prompts)
    table = r.heads.sort_values(["layer", "head"])
    np.testing.assert_allclose(table["score"], s.mean(0).flatten().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(table["control_score"], c.mean(0).flatten().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(table["score_sem"], (s.std(0) / len(r.prompts) ** 0.5).flatten().numpy(), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(r.patterns, pat.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.control_patterns, cpat.float(), rtol=1e-5, atol=1e-6)
    assert r.patterns.shape == (model.cfg.n_layers, model.cfg.n_heads, 5, 5)
    # ranked by the difference, best first
    assert r.heads["rank"].tolist() == list(range(1, len(r.heads) + 1))
    assert r.heads["difference"].is_monotonic_decreasing
    np.testing.assert_allclose(r.heads["difference"], r.heads["score"] - r.heads["control_score"], atol=1e-12)
    assert r.top(3).equals(r.heads.head(3))


def test_subjoiner_is_deterministic_and_seeded(tiny_models, tokenizer):
    model = _with_tokenizer(tiny_models["llama"], tokenizer)
    kwargs = dict(n_pieces=3, n_context_words=4, min_prompts=5, max_prompts=8, progress=False)
    a = subjoiner_heads(model, _text(), seed=0, **kwargs)
    b = subjoiner_heads(model, _text(), seed=0, **kwargs)
    c = subjoiner_heads(model, _text(), seed=1, **kwargs)
    assert a.prompts == b.prompts and a.heads.equals(b.heads)
    assert a.prompts != c.prompts


def test_subjoiner_refuses_too_little_text(tiny_models, tokenizer):
    model = _with_tokenizer(tiny_models["gpt2"], tokenizer)
    with pytest.raises(ValueError, match="min_prompts is 50"):
        subjoiner_heads(model, _text(n_words=200), n_pieces=3, n_context_words=4, min_prompts=50, progress=False)
    with pytest.raises(ValueError, match="min_prompts"):
        subjoiner_heads(model, "the cat sat on the mat", n_pieces=3, n_context_words=4, progress=False)
    with pytest.raises(ValueError, match="n_pieces"):
        subjoiner_heads(model, _text(), n_pieces=1, progress=False)
    with pytest.raises(ValueError, match="has none"):
        subjoiner_heads(tiny_models["gpt2"], _text(), progress=False)


# ---------------------------------------------------------------------------------------------
# first-block damage


def _summary(n=10):
    kl = [6.0, 1.0] + [0.2] * (n - 3) + [2.0]
    rows = [dict(kind="none", layer=pd.NA, relative_depth=np.nan, kl_nats=0.0, loss_delta=0.0,
                 relative_accuracy=1.0, top1_agreement=1.0)]
    for i in range(n):
        rows.append(dict(kind="drop", layer=i, relative_depth=i / (n - 1), kl_nats=kl[i], loss_delta=kl[i] / 2,
                         relative_accuracy=1 - kl[i] / 10, top1_agreement=1 - kl[i] / 8))
    for i in range(n - 1):
        rows.append(dict(kind="swap", layer=i, relative_depth=i / (n - 1), kl_nats=kl[i] / 3, loss_delta=kl[i] / 6,
                         relative_accuracy=1 - kl[i] / 30, top1_agreement=1 - kl[i] / 24))
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    return df


def test_first_blocks_damage_reads_a_sweep_summary():
    d = first_blocks_damage(_summary(), fraction=0.2)
    assert set(d["kind"]) == {"drop", "swap"}
    assert set(d["measure"]) == {"kl_nats", "loss_delta", "accuracy_lost", "disagreement"}
    row = d[(d.kind == "drop") & (d.measure == "kl_nats")].iloc[0]
    assert row["n_first"] == 2 and row["n_rest"] == 8  # i / 9 < 0.2: blocks 0 and 1
    assert row["first_mean"] == pytest.approx(3.5)
    assert row["rest_mean"] == pytest.approx((0.2 * 7 + 2.0) / 8)
    assert row["ratio"] == pytest.approx(3.5 / ((0.2 * 7 + 2.0) / 8))
    assert row["worst_layer"] == 0 and row["worst_value"] == 6.0
    acc = d[(d.kind == "drop") & (d.measure == "accuracy_lost")].iloc[0]
    assert acc["first_mean"] == pytest.approx(0.35)
    swap = d[(d.kind == "swap") & (d.measure == "kl_nats")].iloc[0]
    assert swap["n_first"] == 2 and swap["n_rest"] == 7


def test_first_blocks_damage_refuses_bad_input():
    with pytest.raises(ValueError, match="lacks columns"):
        first_blocks_damage(_summary().drop(columns=["kl_nats"]))
    with pytest.raises(ValueError, match="fraction"):
        first_blocks_damage(_summary(), fraction=1.5)
    with pytest.raises(ValueError, match="no intervention rows"):
        first_blocks_damage(_summary().query("kind == 'none'"))
    with pytest.raises(ValueError, match="both must be non-empty"):
        first_blocks_damage(_summary().query("kind == 'none' or layer == 0"))
    with pytest.raises(TypeError, match="summary"):
        first_blocks_damage([1, 2, 3])


def test_first_blocks_damage_on_a_real_sweep_result(tiny_models, tiny_tokens):
    from stages_of_inference.robustness import robustness_sweep

    sweep = robustness_sweep(tiny_models["gpt2"], tiny_tokens, progress=False)
    d = first_blocks_damage(sweep, fraction=0.3)  # a SweepResult or its summary
    assert d.equals(first_blocks_damage(sweep.summary, fraction=0.3))
    drop = sweep.summary.query("kind == 'drop'")
    row = d[(d.kind == "drop") & (d.measure == "kl_nats")].iloc[0]
    assert row["first_mean"] == pytest.approx(drop[drop.relative_depth < 0.3]["kl_nats"].mean())


# ---------------------------------------------------------------------------------------------
# the real embedded model (SmolLM2-135M, 30 blocks)


@pytest.mark.real
def test_real_previous_token_attention_is_early(real_model, real_tokens):
    df = previous_token_attention(real_model, real_tokens, k=5, progress=False)
    first = df.loc[df["relative_depth"] < 0.2, "mean_attention"].mean()  # blocks 0-5
    late = df.loc[df["relative_depth"] >= 0.5, "mean_attention"].mean()  # blocks 15-29
    # measured on 4 x 128 tokens of the bundled corpus: 0.047 vs 0.039 (block 1: 0.083)
    assert first > 1.1 * late
    assert df["mean_attention"].iloc[:3].max() > 2 * df["mean_attention"].iloc[-8:].min()


@pytest.mark.real
def test_real_subjoiner_head_beats_controls(real_model):
    from stages_of_inference.data import corpus_texts

    r = subjoiner_heads(real_model, corpus_texts("default")[:1], max_prompts=32, progress=False)
    best = r.heads.iloc[0]
    # measured: block 3 head 2, 0.88 of the last piece's attention on the word's earlier pieces,
    # against 0.10 on the same offsets in control prompts
    assert best["difference"] > 0.4
    assert best["z"] > 6
    assert best["score"] > 2 * best["control_score"]
    assert best["relative_depth"] < 1 / 3
