"""Guess then refine: against the lens written out on TransformerLens' own cache, with the buckets,
the word classes and the prediction depth counted by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from stages_of_inference.stages.guesses import (
    BUCKETS,
    FUNCTION_WORDS,
    frequency_buckets,
    guess_then_refine,
    word_classes,
)
from tests.conftest import make_tiny_model, tl_lens_stack

WORDS = ["<bos>", "<unk>", "the", "of", "and", "to", "a", "in", "is", "was", "it", "he", ",", ".", "42"] + \
    [f"w{i}" for i in range(86)]


def _with_words(family: str):  # noqa: ANN202 - a tiny HookedTransformer whose vocabulary holds function words
    model = make_tiny_model(family)
    assert model.cfg.d_vocab == len(WORDS)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")
    return model


def test_frequency_buckets_are_ranks_of_the_counts() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, 3000)
    got = frequency_buckets(counts)
    # the rank written out: sort by count, descending, ties by id; count 0 is "unseen"
    ranked = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    for rank, token in enumerate(ranked, start=1):
        want = 4 if counts[token] == 0 else 0 if rank <= 10 else 1 if rank <= 100 else 2 if rank <= 1000 else 3
        assert got[token] == want, (token, rank)
    assert BUCKETS[4] == "unseen"


def test_word_classes() -> None:
    assert len(FUNCTION_WORDS) == 131
    assert word_classes(["Ġthe", "ĠThe", "▁of", "Ġcat", "cat", ",", "42", "Ġ", None]).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("convention", ["paper", "per_layer_norm"])
def test_guess_then_refine_equals_the_lens_counted_by_hand(family: str, convention: str, tiny_tokens: torch.Tensor) -> None:
    model = _with_words(family)
    n = model.cfg.n_layers
    counts = np.random.default_rng(1).integers(0, 9, model.cfg.d_vocab)
    out = guess_then_refine(model, tiny_tokens, convention, frequencies=counts, batch_size=2, chunk_tokens=13,
                            progress=False)
    stack = tl_lens_stack(model, tiny_tokens, convention)
    top1 = stack.argmax(dim=-1)[:, :, 1:-1].reshape(n + 1, -1).numpy()  # [readout, scored row]
    targets = tiny_tokens[:, 2:].reshape(-1).numpy()
    bucket = frequency_buckets(counts)
    buckets = out["buckets"].set_index(["layer", "bucket"])
    for k in range(n + 1):
        for b, name in enumerate(BUCKETS):
            assert buckets.loc[(k, name), "guess_share"] == pytest.approx(np.mean(bucket[top1[k]] == b), abs=1e-12)
            mine = bucket[targets] == b
            want = np.mean(top1[k][mine] == targets[mine]) if mine.any() else np.nan
            assert buckets.loc[(k, name), "accuracy"] == pytest.approx(want, abs=1e-12, nan_ok=True)
    # prediction depth: the first readout from which the top-1 stays the final one
    depth = np.array([min(k for k in range(n + 1) if (top1[k:, row] == top1[n, row]).all()) for row in range(top1.shape[1])])
    classes = word_classes([WORDS[i] for i in range(len(WORDS))])[top1[n]]
    words = out["words"].set_index("word_class")
    assert words["n_tokens"].sum() == top1.shape[1]
    for c, name in enumerate(("function", "content", "other")):
        d = depth[classes == c]
        assert words.loc[name, "n_tokens"] == len(d)
        if len(d):
            assert words.loc[name, "mean_depth"] == pytest.approx(d.mean())
            assert words.loc[name, "median_depth"] == pytest.approx(np.median(d))
            assert words.loc[name, "mean_relative_depth"] == pytest.approx(d.mean() / n)
    by_bucket = out["depth_by_bucket"].set_index("bucket")
    assert by_bucket["n_tokens"].sum() == top1.shape[1]
    for b, name in enumerate(BUCKETS):
        d = depth[bucket[top1[n]] == b]
        assert by_bucket.loc[name, "n_tokens"] == len(d)
        if len(d):
            assert by_bucket.loc[name, "mean_depth"] == pytest.approx(d.mean())
            assert by_bucket.loc[name, "median_depth"] == pytest.approx(np.median(d))
    assert out["buckets"].attrs["provenance"]["settings"]["convention"] == convention


def test_bad_input_is_refused(tiny_tokens: torch.Tensor) -> None:
    model = _with_words("gpt2")
    with pytest.raises(ValueError, match="frequencies must be 101 non-negative counts"):
        guess_then_refine(model, tiny_tokens, frequencies=np.ones(7), progress=False)
    with pytest.raises(ValueError, match="frequencies must be 101 non-negative counts"):
        guess_then_refine(model, tiny_tokens, frequencies=-np.ones(101), progress=False)
    model.tokenizer = None
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        guess_then_refine(model, tiny_tokens, progress=False)
