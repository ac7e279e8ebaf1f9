"""The embedded model (SmolLM2-135M) on both backends: against its own Hugging Face forward with the
layer list reordered, the two backends against each other where both exist, and a study on the
Bridge. Runs under TransformerLens 3.9 (``.venv``, both backends) and 4.3 (``.venv-tl4``, the
Bridge only); ``make test`` runs both."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import stages_of_inference as soi
from stages_of_inference._tl import HAS_BRIDGE, HAS_HOOKED, TL_VERSION
from stages_of_inference.backends import backend_of
from stages_of_inference.interventions.executor import evaluate_plans
from stages_of_inference.models import ModelNotAvailableError, check_backend, checkpoint_folder
from stages_of_inference.study import StudyConfig, run_study

pytestmark = [pytest.mark.real, pytest.mark.skipif(not HAS_BRIDGE, reason="this TransformerLens has no Bridge")]

ATOL = 1e-4


@pytest.fixture(scope="module")
def bridge():  # noqa: ANN201
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return soi.load_model("smollm2-135m", backend="bridge")


@pytest.fixture(scope="module")
def tokens(bridge) -> torch.Tensor:  # noqa: ANN001
    return soi.load_tokens(bridge, corpus="default", n_sequences=2, seq_len=64, seed=0)


def _plans(n: int) -> list[soi.LayerPlan]:
    return [soi.LayerPlan.identity(n)] + [soi.LayerPlan.drop(n, i) for i in range(n)] + \
        [soi.LayerPlan.swap(n, i) for i in range(n - 1)] + [soi.LayerPlan.repeat(n, [i]) for i in (0, 15, n - 1)]


def test_auto_picks_the_hooked_transformer_where_it_exists_else_the_bridge() -> None:
    assert check_backend("auto") == ("hooked" if HAS_HOOKED else "bridge")
    if not HAS_HOOKED:
        with pytest.raises(ModelNotAvailableError, match=f"needs HookedTransformer, which TransformerLens {TL_VERSION}"):
            check_backend("hooked")


def test_the_bridge_equals_the_hf_model_with_its_layers_reordered(bridge, tokens: torch.Tensor) -> None:  # noqa: ANN001
    """A deletion and a swap at each end and in the middle, against transformers' own forward of
    the same converted checkpoint with ``model.model.layers`` reordered, scored in float64."""
    from transformers import AutoModelForCausalLM

    assert backend_of(bridge) == "bridge"
    hf = AutoModelForCausalLM.from_pretrained(checkpoint_folder("smollm2-135m"), dtype=torch.float32).eval()
    layers = hf.model.layers
    n = len(layers)
    chosen = [soi.LayerPlan.drop(n, i) for i in (0, 15, n - 1)] + [soi.LayerPlan.swap(n, i) for i in (0, 15, n - 2)]
    out = evaluate_plans(bridge, tokens, [soi.LayerPlan.identity(n), *chosen], progress=False)

    def logits(order: tuple[int, ...]) -> torch.Tensor:
        hf.model.layers = nn.ModuleList([layers[i] for i in order])
        hf.config.num_hidden_layers = len(order)
        try:
            with torch.no_grad():
                return hf(tokens, use_cache=False).logits
        finally:
            hf.model.layers, hf.config.num_hidden_layers = layers, n

    keep = slice(1, tokens.shape[1] - 1)
    base = logits(tuple(range(n)))[:, keep].double().log_softmax(-1)
    for plan, row in zip(chosen, out.iloc[1:].itertuples()):
        lp = logits(plan.order)[:, keep].double().log_softmax(-1)
        kl = float((base.exp() * (base - lp)).sum(-1).mean())
        assert row.kl_nats == pytest.approx(kl, abs=ATOL, rel=1e-4), plan.label


@pytest.mark.skipif(not HAS_HOOKED, reason="TransformerLens 4 has no HookedTransformer to compare with")
def test_both_backends_give_the_same_numbers(bridge, tokens: torch.Tensor) -> None:  # noqa: ANN001
    hooked = soi.load_model("smollm2-135m", backend="hooked")
    n = hooked.cfg.n_layers
    a = evaluate_plans(hooked, tokens, _plans(n), progress=False)
    b = evaluate_plans(bridge, tokens, _plans(n), progress=False)
    for column in ("kl_nats", "loss"):
        np.testing.assert_allclose(b[column].to_numpy(), a[column].to_numpy(), atol=2e-4, err_msg=column)
    assert float((a["accuracy"] - b["accuracy"]).abs().max()) <= 1 / a["n_tokens"].iloc[0]  # a top-1 tie at most


@pytest.mark.skipif(not HAS_HOOKED, reason="TransformerLens 4 has no HookedTransformer to compare with")
def test_the_hook_reading_analyses_agree_on_both_backends(bridge, tokens: torch.Tensor) -> None:  # noqa: ANN001
    """Previous-token attention, layer similarity and the sink profile read the Bridge's hooks by
    their compatibility names; the numbers equal the HookedTransformer's to fp32 rounding."""
    from stages_of_inference.stages import detokenization, feature_engineering, sinks

    hooked = soi.load_model("smollm2-135m", backend="hooked")
    for run in (lambda m: detokenization.previous_token_attention(m, tokens, progress=False),
                lambda m: feature_engineering.layer_similarity(m, tokens, progress=False),
                lambda m: sinks.sink_profile(m, tokens, progress=False)):
        a, b = run(hooked), run(bridge)
        assert list(a.columns) == list(b.columns)
        for column in a.columns:
            if a[column].dtype.kind in "fi" and not column.endswith("_sem"):
                np.testing.assert_allclose(b[column].to_numpy(float), a[column].to_numpy(float), rtol=1e-4, atol=1e-6,
                                           err_msg=column)


def test_a_study_on_the_bridge_runs_every_analysis_and_leaves_out_one_that_needs_hooked(tmp_path, bridge,
                                                                                      monkeypatch) -> None:  # noqa: ANN001
    import pandas as pd

    from stages_of_inference.study import registry

    monkeypatch.setitem(registry.REGISTRY, "hooked_only", registry.Analysis(
        "hooked_only", lambda ctx: {"n": pd.DataFrame({"n": [1]})}, bridge=False))
    config = StudyConfig(models=("smollm2-135m",), n_tokens=64, seq_len=32,
                         analyses=("robustness", "logit_lens", "probes", "hooked_only"), backend="bridge",
                         static_formats=())
    study = run_study([bridge], config=config, out_dir=tmp_path / "study", progress=False, log=None)
    assert set(study.results["smollm2-135m"]) == {"robustness", "logit_lens", "probes"}
    assert study.left_out == [("smollm2-135m", "hooked_only")]
    page = study.report.read_text()
    assert "Left out" in page and "hooked_only (smollm2-135m)" in page and "id='layer_effects'" in page
    assert "id='logit_lens'" in page and "id='probes'" in page
    from stages_of_inference.study import load_study

    assert load_study(tmp_path / "study").left_out == [("smollm2-135m", "hooked_only")]  # read back from provenance


def _assert_same_tables(a, b, what: str, rtol: float = 1e-4, atol: float = 2e-5) -> None:  # noqa: ANN001
    frames = a if isinstance(a, tuple) else (a,)
    others = b if isinstance(b, tuple) else (b,)
    for x, y in zip(frames, others):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(y, x, rtol=rtol, atol=atol, msg=what)
            continue
        assert list(x.columns) == list(y.columns), what
        for column in x.columns:
            if x[column].dtype.kind in "fi":
                np.testing.assert_allclose(y[column].to_numpy(float), x[column].to_numpy(float), rtol=rtol, atol=atol,
                                           err_msg=f"{what}: {column}")
            elif x[column].dtype.kind in "bO" and column not in ("plan",):
                assert x[column].astype(str).tolist() == y[column].astype(str).tolist(), f"{what}: {column}"


def _translators(model, tokens: torch.Tensor):  # noqa: ANN001, ANN202
    """The loss of a tuned lens's first step per readout (Adam's first step is lr * sign(gradient), so
    the translators themselves would differ wherever fp32 rounding flips the sign of a near-zero
    gradient)."""
    import pandas as pd

    from stages_of_inference.tuned_lens import TuningSettings, train_tuned_lens

    lens = train_tuned_lens(model, tokens[:1], TuningSettings(steps=1, tokens_per_step=32), cache=False, progress=False)
    return pd.DataFrame({"train_kl_nats": lens.provenance["train_kl_nats"]})


def _by_head(result):  # noqa: ANN001, ANN202 - a SubjoinerResult as tables in a fixed order (ties may rank either way)
    heads = result.heads.drop(columns="rank").sort_values(["layer", "head"]).reset_index(drop=True)
    return heads, result.patterns, result.control_patterns


@pytest.mark.skipif(not HAS_HOOKED, reason="TransformerLens 4 has no HookedTransformer to compare with")
def test_every_stage_analysis_agrees_on_both_backends(bridge, tokens: torch.Tensor) -> None:  # noqa: ANN001
    """The lens (both conventions and a tuned lens), prediction depth, probes, the neuron analyses, sharpening, the
    final-block ablation, the subjoiner heads, the task analysis, guess-then-refine and a tuned lens's first step, on
    SmolLM2 through the Bridge (compatibility mode) and the HookedTransformer: the same tables to fp32 rounding."""
    from stages_of_inference.data import corpus_documents
    from stages_of_inference.stages import detokenization as detok
    from stages_of_inference.stages import feature_engineering as fe
    from stages_of_inference.stages import prediction_ensembling as pe
    from stages_of_inference.stages import residual_sharpening as rs
    from stages_of_inference.stages import task_damage as td
    from stages_of_inference.stages.guesses import guess_then_refine
    from stages_of_inference.tuned_lens import TuningSettings, train_tuned_lens

    hooked = soi.load_model("smollm2-135m", backend="hooked")
    texts = [t[:20_000] for t in corpus_documents("default")]
    items = td.cloze_items(texts, n_items=4, context_chars=100)
    lens = train_tuned_lens(hooked, tokens[:1], TuningSettings(steps=2, tokens_per_step=32), cache=False, progress=False)
    runs = {
        "lens paper": lambda m: fe.logit_lens(m, tokens, convention="paper", progress=False),
        "lens per-layer norm": lambda m: fe.logit_lens(m, tokens, convention="per_layer_norm", progress=False),
        "prediction depth": lambda m: fe.prediction_depth(m, tokens, progress=False),
        "probes": lambda m: fe.probe_layers(m, tokens, "continues_word", points=[0, 10, 30], progress=False),
        "neuron moments": lambda m: pe.neuron_moments(m, layers=[0, 29], progress=False),
        "token-class neurons": lambda m: pe.token_class_neurons(m, "ends_with_ing", top=5, layers=[0, 29]),
        "neuron activations": lambda m: pe.neuron_activations(m, tokens, [(3, 5), (20, 100)], progress=False),
        "sharpening": lambda m: rs.sharpening_profile(m, tokens, moments=False, progress=False),
        "final blocks": lambda m: rs.final_block_ablation(m, tokens, last_k=(1, 2), progress=False),
        "subjoiner heads": lambda m: _by_head(detok.subjoiner_heads(m, texts, max_prompts=16, min_prompts=4,
                                                                    progress=False)),
        "task": lambda m: td.task_damage(m, items, tokens[:2, :8], new_tokens=4, progress=False),
        "guess then refine": lambda m: tuple(guess_then_refine(m, tokens, progress=False).values()),
        "tuned lens": lambda m: fe.logit_lens(m, tokens, convention=lens, progress=False),
        "tuned lens training": lambda m: _translators(m, tokens),
    }
    for what, run in runs.items():
        _assert_same_tables(run(hooked), run(bridge), what)
