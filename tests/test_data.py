"""Corpora and token batches: bundled text, files, iterables, determinism and every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import stages_of_inference as soi
from stages_of_inference import data


def test_bundled_corpora_are_clean() -> None:
    docs = data.corpus_texts("default")
    assert len(docs) == 7
    assert sum(len(d) for d in docs) > 4_000_000
    assert all("gutenberg" not in d.lower() for d in docs)
    assert docs[0].startswith("EMMA")
    assert "\n" not in docs[0].split("\n\n")[10]  # hard line breaks inside paragraphs are joined
    with pytest.raises(ValueError, match="bundled corpora: austen, default, melville"):
        data.corpus_texts("pile")


@pytest.mark.real
def test_tokens_bos_first_consecutive_deterministic(real_model) -> None:
    a = soi.load_tokens(real_model, n_sequences=3, seq_len=32, seed=1)
    b = soi.load_tokens(real_model, n_sequences=3, seq_len=32, seed=1)
    c = soi.load_tokens(real_model, n_sequences=3, seq_len=32, seed=2)
    assert a.shape == (3, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 0).all() and (a[:, 1:] != 0).all()
    # Each row is consecutive text of one document: its decoded text appears verbatim in the corpus.
    corpus = "".join(data.corpus_texts("default"))
    for row in a:
        assert real_model.tokenizer.decode(row[1:]) in corpus


@pytest.mark.real
def test_tokens_from_files_folders_and_iterables(real_model, tmp_path: Path) -> None:
    text = "It is a truth universally acknowledged. " * 40
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text(text.upper())
    from_file = soi.load_tokens(real_model, tmp_path / "a.txt", n_sequences=2, seq_len=16)
    from_list = soi.load_tokens(real_model, [text], n_sequences=2, seq_len=16)
    assert torch.equal(from_file, from_list)
    from_folder = soi.load_tokens(real_model, tmp_path, n_sequences=8, seq_len=16)
    assert from_folder.shape == (8, 16)
    from_generator = soi.load_tokens(real_model, (t for t in [text, text]), n_sequences=2, seq_len=16)
    assert from_generator.shape == (2, 16)


@pytest.mark.real
def test_bad_inputs_raise_clear_errors(real_model, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exceeds the model's context of 8192"):
        soi.load_tokens(real_model, seq_len=9000)
    with pytest.raises(ValueError, match="n_sequences must be a positive integer"):
        soi.load_tokens(real_model, n_sequences=0)
    with pytest.raises(ValueError, match="seq_len must be an integer of at least 3"):
        soi.load_tokens(real_model, seq_len=2)
    with pytest.raises(ValueError, match=r"yields only 1 windows of 63 tokens, fewer than the 5"):
        soi.load_tokens(real_model, ["word " * 100], n_sequences=5, seq_len=64)
    with pytest.raises(ValueError, match="is empty"):
        soi.load_tokens(real_model, ["", ""], n_sequences=1, seq_len=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no .txt files"):
        soi.load_tokens(real_model, empty)
    with pytest.raises(FileNotFoundError, match="no such corpus file"):
        soi.load_tokens(real_model, "./missing.txt")
    with pytest.raises(TypeError, match="corpus must be"):
        soi.load_tokens(real_model, 42)
    with pytest.raises(TypeError, match="every document must be a str"):
        soi.load_tokens(real_model, [b"bytes"], n_sequences=1, seq_len=8)


def test_unreachable_dataset_name_fails_fast(real_model, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="hub is not reachable"):
        soi.load_tokens(real_model, "NeelNanda/pile-10k")


def test_model_without_tokenizer_is_refused(tiny_models: dict) -> None:
    with pytest.raises(ValueError, match="no tokenizer"):
        soi.load_tokens(tiny_models["gpt2"])
    with pytest.raises(TypeError, match="HookedTransformer"):
        soi.load_tokens("smollm2-135m")
