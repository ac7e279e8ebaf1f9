"""The engine against the authors' methods: hook zeroing for deletion, weight swap + reload for
swaps; the prefix-sharing sweep against every plan run alone; ``reordered`` surgery."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer

from stages_of_inference import LayerPlan, reordered, run_plan
from stages_of_inference.backends.state import original
from stages_of_inference.interventions.executor import block_count, evaluate, evaluate_plans
from stages_of_inference.interventions.hooks import drop_layer
from stages_of_inference.metrics import sequence_metrics
from tests.authors import authors_entropy_bits, weight_swapped

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def direct_metrics(logits: torch.Tensor, ref_logits: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    m = sequence_metrics(logits, tokens, ref_logits=ref_logits)
    ref = sequence_metrics(ref_logits, tokens)
    return {
        "kl_nats": float(m["kl_nats"].double().mean()),
        "loss": float(m["loss"].double().mean()),
        "loss_delta": float((m["loss"].double() - ref["loss"].double()).mean()),
        "accuracy": float(m["correct"].double().mean()),
        "top1_agreement": float(m["agree"].double().mean()),
        "entropy_bits": float(authors_entropy_bits(logits[:, 1:-1]).mean()),
        "confidence": float(m["confidence"].double().mean()),
    }


def all_plans(n: int) -> list[LayerPlan]:
    return (
        [LayerPlan.drop(n, i) for i in range(n)]
        + [LayerPlan.swap(n, i) for i in range(n - 1)]
        + [LayerPlan.identity(n), LayerPlan.repeat(n, [1, 2]), LayerPlan.permute(n, list(range(n))[::-1]),
           LayerPlan(order=(0, 0), n_layers=n), LayerPlan.drop(n, 1, 2), LayerPlan.drop(n, 2)]  # a duplicate
    )


# --------------------------------------------------------------------------- one plan
def test_identity_plan_is_the_model(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    n = tiny_model.cfg.n_layers
    expected = tiny_model(tiny_tokens)
    got = run_plan(tiny_model, tiny_tokens, LayerPlan.identity(n))
    assert (got - expected).abs().max() <= ATOL
    loss = run_plan(tiny_model, tiny_tokens, LayerPlan.identity(n), return_type="loss")
    assert abs(float(loss) - float(tiny_model(tiny_tokens, return_type="loss"))) <= ATOL
    logits, loss2 = run_plan(tiny_model, tiny_tokens, LayerPlan.identity(n), return_type="both")
    assert torch.equal(logits, got) and float(loss2) == float(loss)
    assert run_plan(tiny_model, tiny_tokens, LayerPlan.identity(n), return_type=None) is None


def test_drop_equals_zeroing_attn_and_mlp_outputs(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    n = tiny_model.cfg.n_layers
    base = tiny_model(tiny_tokens)
    for i in range(n):
        authors = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=drop_layer(tiny_model, i))
        ours = run_plan(tiny_model, tiny_tokens, LayerPlan.drop(n, i))
        assert (ours - authors).abs().max() <= ATOL, f"drop {i}"
        assert (ours - base).abs().max() > 0.1, "the tiny model must notice a deleted block"
        a, b = direct_metrics(ours, base, tiny_tokens), direct_metrics(authors, base, tiny_tokens)
        for key in ("kl_nats", "loss", "accuracy"):
            assert abs(a[key] - b[key]) <= ATOL


def test_swap_equals_weight_swap_and_reload(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    n = tiny_model.cfg.n_layers
    base = tiny_model(tiny_tokens)
    for i in range(n - 1):
        authors = weight_swapped(tiny_model, i)(tiny_tokens)
        ours = run_plan(tiny_model, tiny_tokens, LayerPlan.swap(n, i))
        assert (ours - authors).abs().max() <= ATOL, f"swap {i}"
        assert (ours - base).abs().max() > 0.1, "the tiny model must notice a swap"
        a, b = direct_metrics(ours, base, tiny_tokens), direct_metrics(authors, base, tiny_tokens)
        for key in ("kl_nats", "loss", "accuracy"):
            assert abs(a[key] - b[key]) <= ATOL


def test_plan_for_another_model_is_refused(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="plan for a model with 7 blocks, but this model has 4"):
        run_plan(tiny_model, tiny_tokens, LayerPlan.drop(7, 1))
    with pytest.raises(TypeError):
        run_plan(tiny_model, tiny_tokens, (0, 1, 2))  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError), match="return_type"):
        run_plan(tiny_model, tiny_tokens, LayerPlan.identity(4), return_type="probs")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reordered
@pytest.mark.parametrize("make", [
    lambda n: LayerPlan.drop(n, 1), lambda n: LayerPlan.swap(n, 2), lambda n: LayerPlan.repeat(n, [0, 3]),
    lambda n: LayerPlan.permute(n, list(range(n))[::-1]), lambda n: LayerPlan(order=(2,), n_layers=n),
])
def test_reordered_forward_equals_run_plan(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor, make) -> None:
    plan = make(tiny_model.cfg.n_layers)
    expected = run_plan(tiny_model, tiny_tokens, plan)
    with reordered(tiny_model, plan) as m:
        assert m is tiny_model
        a = tiny_model(tiny_tokens)
        b = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=[])
        c, cache = tiny_model.run_with_cache(tiny_tokens)
    for got in (a, b, c):
        assert (got - expected).abs().max() <= ATOL
    assert (cache["ln_final.hook_normalized"] is not None)
    assert all(f"blocks.{i}.hook_resid_post" not in cache for i in plan.dropped)


def test_reordered_restores_the_model_after_an_exception(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    n = tiny_model.cfg.n_layers
    blocks, order = tiny_model.blocks, list(tiny_model.blocks)
    expected = tiny_model(tiny_tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with reordered(tiny_model, LayerPlan.repeat(n, [0, 1, 2, 3], times=2)):
            assert len(tiny_model.blocks) == n and isinstance(tiny_model.blocks[-1], torch.nn.Module)
            def boom(x: torch.Tensor, hook) -> None:
                raise RuntimeError("boom")
            tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=[("blocks.2.hook_resid_pre", boom)])
    assert tiny_model.blocks is blocks and list(tiny_model.blocks) == order
    assert original(tiny_model, None) is None  # no reordering of it is remembered
    assert not tiny_model.embed._forward_pre_hooks and not any(b._forward_pre_hooks for b in tiny_model.blocks)
    assert all(not hp.fwd_hooks for hp in tiny_model.hook_points())
    assert torch.equal(tiny_model(tiny_tokens), expected)
    assert set(tiny_model.state_dict()) == {k for k in tiny_model.state_dict()}
    assert [k for k in tiny_model.state_dict() if k.startswith("blocks.")][0].startswith("blocks.0.")


def test_nested_reordered_uses_original_indices(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    n = tiny_model.cfg.n_layers
    with reordered(tiny_model, LayerPlan.swap(n, 0)):
        with reordered(tiny_model, LayerPlan.drop(n, 3)):
            inner = tiny_model(tiny_tokens)
        outer = tiny_model(tiny_tokens)
    assert (inner - run_plan(tiny_model, tiny_tokens, LayerPlan.drop(n, 3))).abs().max() <= ATOL
    assert (outer - run_plan(tiny_model, tiny_tokens, LayerPlan.swap(n, 0))).abs().max() <= ATOL


@pytest.mark.parametrize("runner", ["run_plan", "reordered"])
def test_user_hooks_fire_on_the_block_they_name(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor, runner: str) -> None:
    """A hook on block 2 fires when block 2 runs, wherever the plan puts it, and sees its input."""
    from stages_of_inference.interventions.hooks import current_step

    n = tiny_model.cfg.n_layers
    cases = {
        LayerPlan.swap(n, 1): [(1, 2)],          # block 2 runs at step 1
        LayerPlan.drop(n, 2): [],                # never
        LayerPlan.repeat(n, 2, times=3): [(2, 2), (3, 2), (4, 2)],
        LayerPlan(order=(2, 0, 2), n_layers=n): [(0, 2), (2, 2)],
    }
    for plan, expected_steps in cases.items():
        seen: list[tuple[int, int] | None] = []
        inputs: list[torch.Tensor] = []
        pre: list[torch.Tensor] = []

        def hook(x: torch.Tensor, hook) -> None:
            seen.append(current_step(tiny_model))
            inputs.append(x.clone())

        def record(x: torch.Tensor, hook) -> None:  # the output of every block, in execution order
            pre.append(x.clone())

        hooks = [("blocks.2.hook_resid_pre", hook)] + [(f"blocks.{i}.hook_resid_post", record) for i in range(n)]
        if runner == "run_plan":
            run_plan(tiny_model, tiny_tokens, plan, fwd_hooks=hooks)
        else:
            with reordered(tiny_model, plan):
                tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=hooks)
        assert seen == expected_steps, plan
        for (step, _), x in zip(seen, inputs):
            if step > 0:
                assert torch.equal(x, pre[step - 1])  # block 2's input is the previous step's output
        assert current_step(tiny_model) is None


# --------------------------------------------------------------------------- the sweep
def test_sweep_equals_every_plan_run_alone(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    n = tiny_model.cfg.n_layers
    plans = all_plans(n)
    base = tiny_model(tiny_tokens)
    # batches of 2 (5 sequences: a short last batch) and chunks of 7 rows (not dividing 22 x 2)
    result = evaluate(tiny_model, tiny_tokens, plans, batch_size=2, chunk_tokens=7, per_token=True, progress=False)
    df, tok = result.summary, result.per_token
    assert not df.attrs, "tables carry provenance only; the reference's numbers are the result's own field"
    assert list(df["plan"]) == [p.to_json() for p in plans]
    assert (df["n_tokens"] == tiny_tokens.shape[0] * (tiny_tokens.shape[1] - 2)).all()
    ref = direct_metrics(base, base, tiny_tokens)
    assert abs(result.reference["loss"] - ref["loss"]) <= ATOL
    for row, plan in zip(df.itertuples(), plans):
        expected = direct_metrics(run_plan(tiny_model, tiny_tokens, plan), base, tiny_tokens)
        for key, value in expected.items():
            assert abs(getattr(row, key) - value) <= ATOL, (plan, key)
        if ref["accuracy"] > 0:
            assert abs(row.relative_accuracy - expected["accuracy"] / ref["accuracy"]) <= ATOL
        else:  # random tokens: the tiny model may never be right
            assert row.relative_accuracy != row.relative_accuracy
    # per-token rows equal the directly computed per-token metrics
    plan = LayerPlan.swap(n, 1)
    m = sequence_metrics(run_plan(tiny_model, tiny_tokens, plan), tiny_tokens, ref_logits=base)
    rows = tok[tok["plan"] == plan.to_json()].sort_values(["sequence", "position"])
    assert len(rows) == m["kl_nats"].numel()
    assert (rows["position"].min(), rows["position"].max()) == (1, tiny_tokens.shape[1] - 2)
    assert (rows["token"].to_numpy() == tiny_tokens[:, 2:].reshape(-1).numpy()).all()
    assert abs(rows["kl_nats"].to_numpy() - m["kl_nats"].reshape(-1).numpy()).max() <= ATOL
    assert (rows["top1"].to_numpy() == m["top1"].reshape(-1).numpy()).all()
    assert (rows["top1_original"].to_numpy() == base[:, 1:-1].argmax(-1).reshape(-1).numpy()).all()


@pytest.mark.parametrize("fast_path", [True, False])
def test_score_last_scores_only_the_last_positions(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor,
                                                   fast_path: bool) -> None:
    """``score_last=k``: the metrics of the predictions of the last k tokens only, computed here
    from each plan's own logits with torch's log-softmax."""
    n, k = tiny_model.cfg.n_layers, 3
    plans = all_plans(n)
    T = tiny_tokens.shape[1]
    result = evaluate(tiny_model, tiny_tokens, plans, batch_size=2, per_token=True, progress=False,
                      score_last=k, fast_path=fast_path, layer_effects=True)
    df, tok = result.summary, result.per_token
    assert (df["n_tokens"] == tiny_tokens.shape[0] * k).all()
    assert sorted(tok["position"].unique()) == list(range(T - 1 - k, T - 1))
    ref = torch.log_softmax(tiny_model(tiny_tokens)[:, T - 1 - k : T - 1].double(), -1)
    targets = tiny_tokens[:, T - k :]
    for row, plan in zip(df.itertuples(), plans):
        own = torch.log_softmax(run_plan(tiny_model, tiny_tokens, plan)[:, T - 1 - k : T - 1].double(), -1)
        kl = (ref.exp() * (ref - own)).sum(-1).mean().item()
        loss = -own.gather(-1, targets[..., None]).mean().item()
        accuracy = (own.argmax(-1) == targets).double().mean().item()
        assert abs(row.kl_nats - kl) <= ATOL and abs(row.loss - loss) <= ATOL, plan
        assert abs(row.accuracy - accuracy) <= ATOL, plan
    assert (result.layer_effects["relative_change"].notna()).all()
    with pytest.raises(ValueError, match="score_last=9 but sequences of"):
        evaluate_plans(tiny_model, tiny_tokens[:, :10], plans, score_last=9, progress=False)
    with pytest.raises(ValueError, match="score_last must be a positive number"):
        evaluate_plans(tiny_model, tiny_tokens, plans, score_last=0, progress=False)


def test_sweep_shares_prefixes(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    """The trie runs exactly one block per distinct prefix per batch (the trunk included)."""
    n = tiny_model.cfg.n_layers
    plans = all_plans(n)
    calls = []
    handles = [b.register_forward_pre_hook(lambda mod, args: calls.append(1)) for b in tiny_model.blocks]
    try:
        evaluate_plans(tiny_model, tiny_tokens, plans, batch_size=5, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == block_count(plans) < block_count(plans, shared=False)


def test_sweep_with_user_hooks_matches_hooked_runs(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    n = tiny_model.cfg.n_layers
    hooks = [("blocks.1.mlp.hook_post", lambda x, hook: x * 0.5)]
    plans = [LayerPlan.swap(n, 0), LayerPlan.drop(n, 3)]
    df = evaluate_plans(tiny_model, tiny_tokens, plans, fwd_hooks=hooks, progress=False)
    base = tiny_model.run_with_hooks(tiny_tokens, fwd_hooks=hooks)
    for row, plan in zip(df.itertuples(), plans):
        expected = direct_metrics(run_plan(tiny_model, tiny_tokens, plan, fwd_hooks=hooks), base, tiny_tokens)
        assert abs(row.kl_nats - expected["kl_nats"]) <= ATOL


def test_sweep_input_errors(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="plans is empty"):
        evaluate_plans(tiny_model, tiny_tokens, [], progress=False)
    with pytest.raises(ValueError, match="this model has 4"):
        evaluate_plans(tiny_model, tiny_tokens, [LayerPlan.drop(5, 0)], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_plans(tiny_model, tiny_tokens, [LayerPlan.drop(4, 0)], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="chunk_tokens"):
        evaluate_plans(tiny_model, tiny_tokens, [LayerPlan.drop(4, 0)], chunk_tokens=0, progress=False)
    with pytest.raises(ValueError, match="at least 3 positions"):
        evaluate_plans(tiny_model, tiny_tokens[:, :2], [LayerPlan.drop(4, 0)], progress=False)


def test_sweep_result_types(tiny_models: dict[str, HookedTransformer], tiny_tokens: torch.Tensor) -> None:
    df = evaluate_plans(tiny_models["gpt2"], tiny_tokens, [LayerPlan.identity(4)], progress=False)
    assert isinstance(df, pd.DataFrame)
    row = df.iloc[0]
    assert row["kl_nats"] == 0.0 and row["top1_agreement"] == 1.0 and row["loss_delta"] == 0.0
    assert row["relative_accuracy"] == 1.0 and row["kind"] == "identity"
