"""The logit lens equals TransformerLens' own stacks, in both conventions, streamed or not."""

from __future__ import annotations

import pytest
import torch
from conftest import tl_lens_stack

from stages_of_inference.lens import apply_lens_norm, iter_lens, lens_logits
from stages_of_inference.metrics import log_probs


def _tl_stacks(model, tokens):
    return {c: tl_lens_stack(model, tokens, c) for c in ("paper", "per_layer_norm")}


@pytest.mark.parametrize("convention", ["paper", "per_layer_norm"])
def test_lens_logits_equal_transformer_lens_stacks(tiny_model, tiny_tokens, convention):
    expected = _tl_stacks(tiny_model, tiny_tokens)[convention]
    got = lens_logits(tiny_model, tiny_tokens, convention)
    assert got.shape == (tiny_model.cfg.n_layers + 1, *tiny_tokens.shape, tiny_model.cfg.d_vocab)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_conventions_differ_before_the_output_and_agree_at_it(tiny_model, tiny_tokens):
    paper = lens_logits(tiny_model, tiny_tokens, "paper")
    per_layer = lens_logits(tiny_model, tiny_tokens, "per_layer_norm")
    torch.testing.assert_close(paper[-1], per_layer[-1], rtol=1e-5, atol=1e-5)
    assert (paper[:-1] - per_layer[:-1]).abs().max() > 0.1


@pytest.mark.parametrize("convention", ["paper", "per_layer_norm"])
def test_streamed_chunks_equal_the_full_stack(tiny_model, tiny_tokens, convention):
    full = lens_logits(tiny_model, tiny_tokens, convention)
    seen = 0
    for chunk in iter_lens(tiny_model, tiny_tokens, convention, batch_size=2, chunk_tokens=7, progress=False):
        assert chunk.readouts.shape[1] <= 7
        assert bool((chunk.targets == tiny_tokens[chunk.sequences, chunk.positions + 1]).all())
        for k in (0, tiny_model.cfg.n_layers // 2, tiny_model.cfg.n_layers):
            torch.testing.assert_close(chunk.logits(k), full[k, chunk.sequences, chunk.positions], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chunk.logprobs(1), log_probs(full[1, chunk.sequences, chunk.positions]),
                                   rtol=1e-5, atol=1e-5)
        seen += chunk.readouts.shape[1]
    assert seen == tiny_tokens.shape[0] * (tiny_tokens.shape[1] - 2)


def test_last_readout_is_the_output_without_unembedding_bias(tiny_model, tiny_tokens):
    logits = tiny_model(tiny_tokens)
    for convention in ("paper", "per_layer_norm"):
        lens = lens_logits(tiny_model, tiny_tokens, convention, points=[tiny_model.cfg.n_layers])
        torch.testing.assert_close(lens[0], logits - tiny_model.b_U, rtol=1e-5, atol=1e-4)


def test_apply_lens_norm_rms_does_not_centre(tiny_models):
    llama = tiny_models["llama"]
    x = torch.randn(3, llama.cfg.d_model) + 5.0
    out = apply_lens_norm(llama, x, "paper", final_scale=torch.ones(3, 1))
    torch.testing.assert_close(out, x)  # RMSPre: no centring, scale 1
    gpt2 = tiny_models["gpt2"]
    out = apply_lens_norm(gpt2, x, "paper", final_scale=torch.ones(3, 1))
    torch.testing.assert_close(out.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)


def test_unfolded_final_norm_reads_like_folded():
    """With fold_ln=False the final norm's weight is applied, so the lens matches the folded model."""
    from conftest import tiny_config
    from transformer_lens import HookedTransformer

    torch.manual_seed(0)
    raw = HookedTransformer(tiny_config("gpt2"))
    state = raw.state_dict()
    state["ln_final.w"] = 1 + 0.3 * torch.randn_like(state["ln_final.w"])
    unfolded = HookedTransformer(tiny_config("gpt2"))
    unfolded.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False)
    folded = HookedTransformer(tiny_config("gpt2"))
    folded.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=False, center_unembed=False)
    tokens = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(0))
    for convention in ("paper", "per_layer_norm"):
        a = lens_logits(unfolded, tokens, convention)
        b = lens_logits(folded, tokens, convention)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bad_input_is_refused(tiny_models, tiny_tokens):
    model = tiny_models["gpt2"]
    with pytest.raises(ValueError, match="unknown logit-lens convention"):
        lens_logits(model, tiny_tokens, "tunned")
    with pytest.raises(ValueError, match="not a name"):
        lens_logits(model, tiny_tokens, "tuned")
    with pytest.raises(ValueError, match="out of range"):
        lens_logits(model, tiny_tokens, points=[model.cfg.n_layers + 1])
    with pytest.raises(ValueError, match="needs final_scale"):
        apply_lens_norm(model, torch.randn(2, model.cfg.d_model), "paper")
    with pytest.raises(ValueError, match="chunk_tokens"):
        next(iter_lens(model, tiny_tokens, chunk_tokens=0, progress=False))
    with pytest.raises(TypeError, match="HookedTransformer"):
        lens_logits(torch.nn.Linear(2, 2), tiny_tokens)
