"""Shared fixtures: tiny random models of the three block families, and the real embedded model."""

from __future__ import annotations

import os
from pathlib import Path

import hf_reference  # noqa: F401 - records transformers' own Gemma attention before any test builds a Bridge
import pytest
import torch

from stages_of_inference._tl import HookedTransformer, HookedTransformerConfig

FAMILIES = ("gpt2", "parallel", "llama")
_DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _threads_for_the_model_size(request: pytest.FixtureRequest):
    """One torch thread for tiny-model tests (their matmuls are too small to split, and extra
    threads only contend on a shared machine); all threads for tests of the real model."""
    torch.set_num_threads(_DEFAULT_THREADS if request.node.get_closest_marker("real") else 1)
    yield


def tiny_config(family: str) -> HookedTransformerConfig:
    """A small config of one block family the paper meets.

    * ``gpt2``: sequential attention then MLP, LayerNorm, learned positions, GELU;
    * ``parallel``: attention and MLP read the same residual (Pythia / Phi), LayerNorm, rotary;
    * ``llama``: RMSNorm, gated SiLU MLP, grouped-query attention, rotary.
    """
    common = dict(n_layers=4, d_model=32, d_head=8, n_heads=4, d_mlp=48, d_vocab=101, n_ctx=40,
                  seed=0, device="cpu", dtype=torch.float32)
    if family == "gpt2":
        return HookedTransformerConfig(**common, act_fn="gelu_new", normalization_type="LN",
                                       positional_embedding_type="standard")
    if family == "parallel":
        return HookedTransformerConfig(**common, act_fn="gelu", normalization_type="LN",
                                       positional_embedding_type="rotary", rotary_dim=4,
                                       parallel_attn_mlp=True)
    if family == "llama":
        return HookedTransformerConfig(**common, act_fn="silu", normalization_type="RMS",
                                       positional_embedding_type="rotary", rotary_dim=8,
                                       gated_mlp=True, n_key_value_heads=2, final_rms=True)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def make_tiny_model(family: str, seed: int = 0) -> HookedTransformer:
    """A random model of ``family``, with random norm weights and biases, processed like a real
    checkpoint (fold_ln, center_writing_weights, center_unembed, fold_value_biases)."""
    torch.manual_seed(seed)
    model = HookedTransformer(tiny_config(family))
    state = model.state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    for name, value in state.items():
        if name.endswith(("ln1.w", "ln2.w", "ln_final.w")):
            state[name] = 1 + 0.3 * torch.randn(value.shape, generator=gen)
        elif name.endswith(("ln1.b", "ln2.b", "ln_final.b", "b_in", "b_out", "b_O", "b_Q", "b_K", "b_V")):
            state[name] = 0.1 * torch.randn(value.shape, generator=gen)
        elif name.startswith(("embed.", "pos_embed.")) or ".W_" in name:
            # A larger scale than the default init, so blocks change the output noticeably.
            state[name] = value * 3
    model.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=True,
                                      center_unembed=True, fold_value_biases=True)
    model.eval()
    return model


def tl_lens_stack(model: HookedTransformer, tokens: torch.Tensor, convention: str) -> torch.Tensor:
    """The logit lens computed TransformerLens' way, on its own cache (the tests' reference, not the
    library's code): ``[readout, batch, pos, d_vocab]``. ``"paper"``: every readout divided by the
    final norm's cached scale; ``"per_layer_norm"``: each normalised with its own statistics."""
    n = model.cfg.n_layers
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        if convention == "paper":
            return cache.apply_ln_to_stack(cache.accumulated_resid(), layer=n, recompute_ln=False) @ model.W_U
        return cache.accumulated_resid(apply_ln=True) @ model.W_U


@pytest.fixture(params=FAMILIES, scope="session")
def tiny_model(request: pytest.FixtureRequest) -> HookedTransformer:
    """Each tiny random model in turn (session-wide: tests must not modify it)."""
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, HookedTransformer]:
    """All three tiny random models, by family name."""
    return {family: make_tiny_model(family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_tokens() -> torch.Tensor:
    """Random token batch [5, 24] for the tiny models, BOS (id 0) first."""
    gen = torch.Generator().manual_seed(123)
    tokens = torch.randint(1, 101, (5, 24), generator=gen)
    tokens[:, 0] = 0
    return tokens


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level text for the tiny models' word tokenizer (``w0 .. w98``, sentences of 6 words:
    windows start at sentence boundaries)."""
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text(" ".join(f"w{rng.randrange(99)}" + (". " if i % 6 == 5 else "") for i in range(6000)))
    return path


@pytest.fixture(scope="session")
def real_model() -> HookedTransformer:
    """The embedded default model (SmolLM2-135M), loaded offline, once per test session."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import stages_of_inference as soi

    return soi.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def real_tokens(real_model: HookedTransformer) -> torch.Tensor:
    """4 x 128 tokens of the bundled corpus for the real model (508 scored positions)."""
    import stages_of_inference as soi

    return soi.load_tokens(real_model, corpus="default", n_sequences=4, seq_len=128, seed=0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that uses the real model carries the ``real`` marker (``-m "not real"`` skips them)."""
    for item in items:
        if "real_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real)
