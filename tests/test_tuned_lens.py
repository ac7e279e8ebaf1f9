"""The tuned lens: identity translators are the logit lens; training is Belrose et al.'s loss under
Adam, checked against a plain PyTorch loop on TransformerLens' own cache; it lowers held-out KL; it
is saved, loaded and reused by content; bad input is refused."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import make_tiny_model

from stages_of_inference import tuned_lens as tl
from stages_of_inference.lens import lens_logits
from stages_of_inference.stages.feature_engineering import lens_tables, logit_lens, prediction_depth
from stages_of_inference.tuned_lens import TunedLens, TuningSettings, load_tuned_lens, save_tuned_lens, train_tuned_lens


def _tokens(seed: int, n: int = 6, pos: int = 20) -> torch.Tensor:
    tokens = torch.randint(1, 101, (n, pos), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 0
    return tokens


def _identity(model) -> TunedLens:  # noqa: ANN001
    n, d = model.cfg.n_layers, model.cfg.d_model
    return TunedLens(torch.zeros(n, d, d), torch.zeros(n, d))


def test_identity_translators_are_the_per_layer_norm_logit_lens(tiny_model, tiny_tokens) -> None:  # noqa: ANN001
    lens = _identity(tiny_model)
    assert torch.equal(lens_logits(tiny_model, tiny_tokens, lens), lens_logits(tiny_model, tiny_tokens, "per_layer_norm"))
    a = logit_lens(tiny_model, tiny_tokens, convention=lens, progress=False)
    b = logit_lens(tiny_model, tiny_tokens, convention="per_layer_norm", progress=False)
    assert (a["convention"] == "tuned").all()
    metrics = [c for c in a.columns if c != "convention"]
    pd.testing.assert_frame_equal(a[metrics], b[metrics], check_exact=True)
    depth = prediction_depth(tiny_model, tiny_tokens, convention=lens, progress=False)[1]
    assert depth["convention"].iloc[0] == "tuned"
    assert a.attrs["provenance"]["settings"]["convention"]["name"] == "tuned"


def _reference_training(model, tokens: torch.Tensor, steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Belrose et al.'s loss written with torch.nn on TransformerLens' cache: readout k (every
    scored position) goes through ``h + Linear(h)`` (zero-initialised), the model's own ``ln_final``
    and ``W_U``; the loss is the sum over readouts of KL(final || translated), ``batchmean``; full
    batch, Adam (weights at lr / sqrt(d_model))."""
    n, d = model.cfg.n_layers, model.cfg.d_model
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        resid = cache.accumulated_resid()[:, :, 1:-1].reshape(n + 1, -1, d)  # scored positions, sequence-major
        final = torch.log_softmax(cache["ln_final.hook_normalized"][:, 1:-1].reshape(-1, d) @ model.W_U, -1)
    translators = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n))
    for t in translators:
        torch.nn.init.zeros_(t.weight)
        torch.nn.init.zeros_(t.bias)
    optimiser = torch.optim.Adam([{"params": [t.weight for t in translators], "lr": lr / d**0.5},
                                  {"params": [t.bias for t in translators]}], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = sum(torch.nn.functional.kl_div(
            torch.log_softmax(model.ln_final(resid[k] + translators[k](resid[k])) @ model.W_U, -1), final,
            log_target=True, reduction="batchmean") for k in range(n))
        loss.backward()
        optimiser.step()
    return (torch.stack([t.weight.detach().T for t in translators]), torch.stack([t.bias.detach() for t in translators]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_equals_a_plain_pytorch_loop(family: str) -> None:
    model = make_tiny_model(family)
    tokens = _tokens(1, n=3, pos=12)
    settings = TuningSettings(steps=4, tokens_per_step=10_000, lr=1e-2)  # every position at every step
    lens = train_tuned_lens(model, tokens, settings, cache=False, progress=False)
    weight, bias = _reference_training(model, tokens, settings.steps, settings.lr)
    torch.testing.assert_close(lens.bias, bias, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lens.weight, weight, atol=1e-5, rtol=1e-4)
    assert lens.bias.abs().max() > 0.02  # it moved


def test_soft_capped_models_train_on_the_literal_loss() -> None:
    """With a logit soft-cap the loss is the log-softmax's; without, the log-sum-exp shortcut: the
    two agree where both apply."""
    model = make_tiny_model("llama")
    tokens = _tokens(2, n=2, pos=10)
    readouts = tl._training_readouts(model, tokens, "fp32", 8)
    kl = tl._KLToFinal(model)
    target = kl.target(readouts[-1])
    z = readouts[0] + 0.1
    shortcut = kl(z, target)
    kl.linear = False
    torch.testing.assert_close(shortcut, kl(z, target), atol=1e-5, rtol=1e-5)


def test_training_lowers_held_out_kl_at_every_readout() -> None:
    model = make_tiny_model("gpt2")
    train, held_out = _tokens(3, n=24, pos=24), _tokens(4, n=6, pos=24)
    lens = train_tuned_lens(model, train, TuningSettings(steps=60, tokens_per_step=128, lr=1e-2), cache=False,
                            progress=False)
    tuned = logit_lens(model, held_out, convention=lens, progress=False)
    plain = logit_lens(model, held_out, convention="per_layer_norm", progress=False)
    n = model.cfg.n_layers
    assert (tuned["kl_to_final_nats"].to_numpy()[:n] < 0.9 * plain["kl_to_final_nats"].to_numpy()[:n]).all()
    assert tuned["kl_to_final_nats"].iloc[n] == 0.0  # the output is not translated


def test_saved_lenses_round_trip_and_are_reused_by_content(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    model = make_tiny_model("gpt2")
    tokens, settings = _tokens(5, n=2, pos=10), TuningSettings(steps=2, tokens_per_step=8)
    lens = train_tuned_lens(model, tokens, settings, cache=tmp_path, progress=False)
    path = tl.cached_lens_path(lens.key, tmp_path)
    assert path.is_file() and list(tmp_path.iterdir()) == [path]
    back = load_tuned_lens(path, model)
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    assert back.provenance["tokens"]["sha256"] == lens.provenance["tokens"]["sha256"]

    def no_training(*args: object) -> None:
        raise AssertionError("trained again")
    monkeypatch.setattr(tl, "_fit", no_training)
    again = train_tuned_lens(model, tokens, settings, cache=tmp_path, progress=False)
    assert torch.equal(again.weight, lens.weight)
    with pytest.raises(AssertionError, match="trained again"):  # other settings: another key
        train_tuned_lens(model, tokens, TuningSettings(steps=3, tokens_per_step=8), cache=tmp_path, progress=False)
    with pytest.raises(AssertionError, match="trained again"):  # other tokens
        train_tuned_lens(model, _tokens(6, n=2, pos=10), settings, cache=tmp_path, progress=False)
    monkeypatch.undo()
    path.write_bytes(path.read_bytes()[:100])  # damaged: trained again and replaced
    fresh = train_tuned_lens(model, tokens, settings, cache=tmp_path, progress=False)
    assert torch.equal(fresh.weight, lens.weight)
    assert torch.equal(load_tuned_lens(path).weight, lens.weight)


def test_bad_input_is_refused(tmp_path) -> None:  # noqa: ANN001
    model, other = make_tiny_model("gpt2"), make_tiny_model("llama")
    model.cfg.model_name, other.cfg.model_name = "tiny-gpt2", "tiny-llama"  # a lens checks names and shapes
    tokens = _tokens(7, n=2, pos=10)
    with pytest.raises(ValueError, match="not a name: pass convention=train_tuned_lens"):
        logit_lens(model, tokens, convention="tuned", progress=False)
    lens = train_tuned_lens(model, tokens, TuningSettings(steps=1, tokens_per_step=4), cache=False, progress=False)
    with pytest.raises(ValueError, match="made for another model"):
        logit_lens(other, tokens, convention=lens, progress=False)
    with pytest.raises(ValueError, match="readouts of width"):
        logit_lens(make_tiny_model("gpt2"), tokens, convention=TunedLens(torch.zeros(1, 3, 3), torch.zeros(1, 3)),
                   progress=False)
    with pytest.raises((ValueError, TypeError)):  # the tests' jaxtyping checks, else TunedLens's own
        TunedLens(torch.zeros(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises((ValueError, TypeError)):
        TunedLens(torch.zeros(2, 3, 3), torch.zeros(3, 3))
    for bad in ({"steps": 0}, {"tokens_per_step": 1.5}, {"lr": -1.0}, {"lr": float("nan")}, {"seed": "0"},
                {"precision": "fp8"}):
        with pytest.raises((ValueError, TypeError)):  # a wrong type is caught by jaxtyping in the tests
            TuningSettings(**bad)
    with pytest.raises(TypeError, match="TuningSettings"):
        train_tuned_lens(model, tokens, {"steps": 1}, cache=False)  # type: ignore[arg-type]
    save_tuned_lens(lens, tmp_path / "lens.safetensors")
    with pytest.raises(ValueError, match="made for another model"):
        load_tuned_lens(tmp_path / "lens.safetensors", other)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="is not a readable tuned lens"):
        load_tuned_lens(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(1, 2, 2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="is not a tuned lens of this library"):
        load_tuned_lens(tmp_path / "foreign.safetensors")


def test_lens_tables_of_a_tuned_lens_record_its_key(tiny_tokens) -> None:  # noqa: ANN001
    model = make_tiny_model("parallel")
    lens = train_tuned_lens(model, _tokens(8, n=2, pos=10), TuningSettings(steps=1, tokens_per_step=4), cache=False,
                            progress=False)
    tables = lens_tables(model, tiny_tokens, convention=lens, progress=False)
    record = tables["lens"].attrs["provenance"]["settings"]["convention"]
    assert record["key"] == lens.key and len(lens.key) == 24
    assert set(tables["per_sequence"]["convention"]) == {"tuned"}
