"""Sublayer plans (a block's attention alone, or its MLP alone) and the layer-effect matrix, each
against an independent computation: TransformerLens' own forward with hook points zeroed, and
contributions read off its own caches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from stages_of_inference import LayerPlan, reordered, run_plan
from stages_of_inference.interventions import executor
from stages_of_inference.interventions.executor import block_count, evaluate, evaluate_plans
from stages_of_inference.interventions.hooks import drop_layer
from stages_of_inference.robustness import EFFECT_COLUMNS, robustness_sweep, summary_on
from stages_of_inference.stages.placement import mlp_takes_over, stage_signals
from tests.test_robustness import exact_scores

ATOL = 1e-4
ZEROED = {"drop_attention": "hook_attn_out", "drop_mlp": "hook_mlp_out"}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _zeroing(name: str):
    return (name, lambda act, hook: torch.zeros_like(act))


def _hooked_logits(model: HookedTransformer, tokens: torch.Tensor, kind: str, layer: int) -> torch.Tensor:
    """The reference: the model's own forward with one sublayer's output hook point zeroed."""
    return model.run_with_hooks(tokens, fwd_hooks=[_zeroing(f"blocks.{layer}.{ZEROED[kind]}")])


# ----------------------------------------------------------------------------------------- plans
def test_sublayer_plans_describe_themselves() -> None:
    plan = LayerPlan.drop_attention(6, 2)
    assert plan.order == (0, 1, (2, "mlp"), 3, 4, 5)
    assert (plan.kind, plan.label, repr(plan)) == ("drop_attention", "drop attn 2", "LayerPlan.drop_attention(6, 2)")
    both = LayerPlan.drop_mlp(6, 1, 4)
    assert (both.kind, both.label) == ("drop_mlp", "drop mlp 1,4")
    mixed = LayerPlan(order=(0, (1, "mlp"), (2, "attn")), n_layers=3)
    assert mixed.kind == "custom" and mixed.label == "custom 0,1.mlp,2.attn"
    for p in (plan, both, mixed, LayerPlan(order=(0, (1, "attn"), (1, "mlp"), 2), n_layers=3)):
        assert LayerPlan.from_json(p.to_json()) == p
        assert eval(repr(p), {"LayerPlan": LayerPlan}) == p
    assert plan.dropped == () and plan.has_sublayers and not LayerPlan.drop(3, 1).has_sublayers


@pytest.mark.parametrize(("make", "message"), [
    (lambda: LayerPlan(order=(0, (1, "ffn")), n_layers=2), "part in ('attn', 'mlp')"),
    (lambda: LayerPlan(order=(0, (4, "mlp")), n_layers=2), "out of range"),
    (lambda: LayerPlan.drop_attention(3), "at least one block"),
    (lambda: LayerPlan.drop_mlp(3, 1, 1), "listed twice"),
    (lambda: LayerPlan.drop_mlp(3, 5), "blocks 0 .. 2"),
])
def test_bad_sublayer_plans_are_refused(make, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_an_attention_only_model_refuses_an_mlp_step(tiny_tokens: torch.Tensor) -> None:
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=40, d_head=4, d_vocab=101,
                                                      attn_only=True))
    with pytest.raises(ValueError, match="attention-only"):
        run_plan(model, tiny_tokens, LayerPlan.drop_attention(2, 0))


# ----------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("kind", ["drop_attention", "drop_mlp"])
def test_run_plan_equals_zeroing_the_sublayer(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor, kind: str) -> None:
    n = tiny_model.cfg.n_layers
    for layer in range(n):
        plan = getattr(LayerPlan, kind)(n, layer)
        expected = _hooked_logits(tiny_model, tiny_tokens, kind, layer)
        assert torch.allclose(run_plan(tiny_model, tiny_tokens, plan), expected, atol=ATOL)
        with reordered(tiny_model, plan):
            assert torch.allclose(tiny_model(tiny_tokens), expected, atol=ATOL)


@pytest.mark.parametrize("fast_path", [True, False])
def test_sweep_with_sublayer_kinds_equals_zeroed_forwards(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor,
                                                          fast_path: bool) -> None:
    """Every plan of a four-kind sweep against the model's own forward with hook points zeroed,
    scored exactly (both the fast path and the blocks' own path)."""
    kinds = ("drop", "swap", "drop_attention", "drop_mlp")
    summary = robustness_sweep(tiny_model, tiny_tokens, kinds=kinds, progress=False, fast_path=fast_path,
                               batch_size=2).summary
    base = tiny_model(tiny_tokens)
    for row in summary[summary["kind"].isin(ZEROED)].itertuples():
        expected = exact_scores(_hooked_logits(tiny_model, tiny_tokens, row.kind, int(row.layer)), tiny_tokens, base)
        for metric, value in expected.items():
            assert getattr(row, metric) == pytest.approx(value, abs=ATOL), (row.kind, row.layer, metric)
    drops = summary[summary["kind"] == "drop"]
    for row in drops.itertuples():  # whole-block rows unchanged by the company they keep
        logits = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=drop_layer(tiny_model, int(row.layer)))
        assert row.kl_nats == pytest.approx(exact_scores(logits, tiny_tokens, base)["kl_nats"], abs=ATOL)


def test_both_sublayers_in_turn_are_the_block_on_sequential_families(tiny_models: dict[str, HookedTransformer],
                                                                    tiny_tokens: torch.Tensor) -> None:
    for family in ("gpt2", "llama"):  # sequential blocks: attention, then the MLP on its result
        model = tiny_models[family]
        plan = LayerPlan(order=(0, (1, "attn"), (1, "mlp"), 2, 3), n_layers=4)
        assert torch.allclose(run_plan(model, tiny_tokens, plan), model(tiny_tokens), atol=ATOL)
    # parallel blocks: the MLP reads the block's input, so running it after the attention differs
    model = tiny_models["parallel"]
    plan = LayerPlan(order=(0, (1, "attn"), (1, "mlp"), 2, 3), n_layers=4)
    assert not torch.allclose(run_plan(model, tiny_tokens, plan), model(tiny_tokens), atol=1e-3)


def test_sublayer_plans_share_the_trie_with_block_plans() -> None:
    n = 6
    plans = [LayerPlan.drop(n, 3), LayerPlan.drop_mlp(n, 3), LayerPlan.drop_attention(n, 3)]
    # the trunk (6 blocks) plus three tails of 3 steps that share the first 3 blocks
    assert block_count(plans) == n + 3 * 3 - 1  # drop 3's tail is blocks 4, 5: two steps
    assert block_count(plans, shared=False) == n + 5 + 6 + 6


def test_hooks_on_a_silenced_sublayer_see_zeros(tiny_models: dict[str, HookedTransformer], tiny_tokens: torch.Tensor) -> None:
    model = tiny_models["gpt2"]
    seen = []
    hook = ("blocks.2.hook_attn_out", lambda act, hook: seen.append(float(act.abs().max())))
    run_plan(model, tiny_tokens, LayerPlan.drop_attention(4, 2), fwd_hooks=[hook])
    assert seen == [0.0]


# ----------------------------------------------------------------------------------------- layer effects
def _contributions(model: HookedTransformer, tokens: torch.Tensor, hooks: list) -> tuple[list, list]:
    """Per block, its input residual and its contribution, read from the model's own cache."""
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(tokens)
    pre = [cache[f"blocks.{j}.hook_resid_pre"] for j in range(model.cfg.n_layers)]
    post = [cache[f"blocks.{j}.hook_resid_post"] for j in range(model.cfg.n_layers)]
    return pre, [b - a for a, b in zip(pre, post)]


def test_layer_effects_equal_contributions_read_from_the_models_cache(tiny_model: HookedTransformer,
                                                                      tiny_tokens: torch.Tensor) -> None:
    """The matrix the sweep measures in its trie against the authors' deletion (zeroed outputs)
    and TransformerLens' own cache, per token on positions 1 .. T-2, averaged in float64."""
    n = tiny_model.cfg.n_layers
    result = robustness_sweep(tiny_model, tiny_tokens, kinds=("drop", "swap"), progress=False, batch_size=2,
                              layer_effects=True)
    table = result["layer_effects"]
    assert list(table.columns) == list(EFFECT_COLUMNS)
    keep = slice(1, tiny_tokens.shape[1] - 1)
    pre, clean = _contributions(tiny_model, tiny_tokens, [])
    base = table[table["kind"] == "none"].set_index("block")
    for j in range(n):
        x, c = pre[j][:, keep].double(), clean[j][:, keep].double()
        size = (c.norm(dim=-1) / x.norm(dim=-1)).mean()
        cosine = torch.nn.functional.cosine_similarity(c, x, dim=-1).mean()
        assert base.loc[j, "relative_size"] == pytest.approx(float(size), rel=1e-4)
        assert base.loc[j, "cosine"] == pytest.approx(float(cosine), abs=1e-4)
        assert base.loc[j, "relative_change"] == 0
    for i in range(n):
        _, changed = _contributions(tiny_model, tiny_tokens, drop_layer(tiny_model, i))
        rows = table[(table["kind"] == "drop") & (table["layer"] == i)].set_index("block")
        assert sorted(rows.index) == list(range(i + 1, n))  # the blocks after the deleted one
        for j in range(i + 1, n):
            c, c_ref = changed[j][:, keep].double(), clean[j][:, keep].double()
            expected = ((c - c_ref).norm(dim=-1) / c_ref.norm(dim=-1)).mean()
            assert rows.loc[j, "relative_change"] == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
            per_seq = ((c - c_ref).norm(dim=-1) / c_ref.norm(dim=-1)).mean(dim=1)
            sem = per_seq.std() / np.sqrt(len(per_seq))
            assert rows.loc[j, "relative_change_sem"] == pytest.approx(float(sem), rel=1e-3, abs=1e-6)
    swaps = table[table["kind"] == "swap"]
    assert set(swaps["layer"]) == set(range(n - 1))  # a swap runs both blocks off the trunk: both measured


def test_layer_effects_survive_a_resume(tiny_models: dict[str, HookedTransformer], tiny_tokens: torch.Tensor, tmp_path,
                                        monkeypatch) -> None:
    model = tiny_models["parallel"]
    full = robustness_sweep(model, tiny_tokens, batch_size=2, progress=False, layer_effects=True)
    original, calls = executor._run_batch, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(executor, "_run_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        robustness_sweep(model, tiny_tokens, batch_size=2, progress=False, layer_effects=True, out_dir=tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s" / "checkpoint").glob("*.effects.parquet")) == \
        ["batch_00000.effects.parquet"]
    resumed = robustness_sweep(model, tiny_tokens, batch_size=2, progress=False, layer_effects=True,
                               out_dir=tmp_path / "s")
    pd.testing.assert_frame_equal(resumed["layer_effects"], full["layer_effects"], check_exact=True)


def test_evaluate_reports_layer_effects(tiny_models: dict[str, HookedTransformer], tiny_tokens: torch.Tensor) -> None:
    model = tiny_models["llama"]
    plans = [LayerPlan.drop(4, 1), LayerPlan.drop_mlp(4, 1)]
    effects = evaluate(model, tiny_tokens, plans, progress=False, layer_effects=True).layer_effects
    assert set(effects["label"]) == {"identity (reference)", "drop 1", "drop mlp 1"}
    assert set(effects[effects["label"] == "drop 1"]["block"]) == {2, 3}
    assert set(effects[effects["label"] == "drop mlp 1"]["block"]) == {2, 3}  # its sublayer step is not measured
    assert evaluate(model, tiny_tokens, plans, progress=False).layer_effects is None


# ----------------------------------------------------------------------------------------- study pieces
def test_summary_on_a_subset_equals_a_sweep_of_the_subset(tiny_models: dict[str, HookedTransformer],
                                                          tiny_tokens: torch.Tensor) -> None:
    model = tiny_models["gpt2"]
    full = robustness_sweep(model, tiny_tokens, per_token=True, progress=False)
    sub = robustness_sweep(model, tiny_tokens[:3], progress=False).summary
    got = summary_on(full.per_token, range(3), 4)
    for column in ("kl_nats", "loss_delta", "relative_accuracy", "top1_agreement", "kl_nats_sem",
                   "relative_accuracy_sem", "n_tokens"):
        np.testing.assert_allclose(got[column].to_numpy(dtype=float), sub[column].to_numpy(dtype=float), atol=1e-6)


def test_mlp_takeover_signal() -> None:
    table = pd.DataFrame({"kind": ["drop_attention"] * 5 + ["drop_mlp"] * 5, "layer": list(range(5)) * 2,
                          "kl_nats": [3, .4, .3, .1, .1] + [.5, .5, .1, .4, .5]})
    assert mlp_takes_over(table) == 3  # block 1 alone is not enough: two blocks running
    stages = pd.DataFrame({"stage": ["detokenization", "feature engineering", "prediction ensembling",
                                     "residual sharpening"], "first_layer": [0, 1, 3, 4], "n_blocks": [1, 2, 1, 1]})
    row = stage_signals(stages, sublayers=table).iloc[0]
    assert (row["boundary"], row["layer"], row["rule_layer"], bool(row["agrees"])) == ("feature engineering", 3, 1, False)
    never = table.assign(kl_nats=[1] * 5 + [0] * 5)
    assert mlp_takes_over(never) == -1


def test_real_model_sublayer_sweep_matches_zeroed_forwards(real_model: HookedTransformer, real_tokens: torch.Tensor) -> None:
    """SmolLM2: a few sublayer deletions on two sequences against its own forward with the hook zeroed."""
    tokens = real_tokens[:2]
    n = real_model.cfg.n_layers
    plans = [LayerPlan.identity(n)] + [getattr(LayerPlan, kind)(n, i) for kind in ZEROED for i in (0, 14, n - 1)]
    out = evaluate_plans(real_model, tokens, plans, progress=False)
    base = real_model(tokens)
    for plan, row in zip(plans[1:], out.iloc[1:].itertuples()):
        layer = plan.order.index(next(s for s in plan.order if not isinstance(s, int)))
        expected = exact_scores(_hooked_logits(real_model, tokens, plan.kind, layer), tokens, base)
        assert row.kl_nats == pytest.approx(expected["kl_nats"], abs=ATOL, rel=1e-4), plan.label
        assert row.accuracy == pytest.approx(expected["accuracy"], abs=1e-9), plan.label


def test_the_study_deletes_sublayers_on_a_prefix_beside_the_same_tokens_block_deletions(tmp_path, corpus,
                                                                                       monkeypatch) -> None:
    """With sequences longer than ``SUBLAYER_POSITIONS``, the sublayers run on their start, and the
    whole-block deletions beside them (read from the main sweep's per-token table) equal a sweep
    run on exactly those tokens."""
    from stages_of_inference.study import analyses, run_study
    from tests.test_report import _config, _tiny

    monkeypatch.setattr(analyses, "SUBLAYER_POSITIONS", 10)
    model = _tiny("tiny-gpt2", "gpt2")
    config = _config(corpus, ("tiny-gpt2",), analyses=("robustness", "sublayers"))
    study = run_study(model, config=config, out_dir=tmp_path, progress=False, log=None, write_report=False)
    done = study.results["tiny-gpt2"]["sublayers"]
    from stages_of_inference.data import load_token_batch

    tokens = load_token_batch(model, config.corpus, n_sequences=config.n_sequences, seq_len=config.seq_len,
                              seed=config.seed).tokens[: config.heavy_sequences, :10]
    alone = robustness_sweep(model, tokens, progress=False).summary
    alone = alone[alone["kind"] == "drop"].reset_index(drop=True)
    blocks = done["blocks"]
    assert (blocks["n_tokens"] == config.heavy_sequences * 8).all()
    assert (done["summary"]["n_tokens"] == config.heavy_sequences * 8).all()
    for column in ("kl_nats", "loss_delta", "relative_accuracy", "kl_nats_sem"):
        np.testing.assert_allclose(blocks[column].to_numpy(dtype=float), alone[column].to_numpy(dtype=float), atol=1e-5)
