"""The sweep's hook-free block path equals TransformerLens' own blocks, and steps aside when it must."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, make_tiny_model, tiny_config
from transformer_lens import HookedTransformer, HookedTransformerConfig

import stages_of_inference as soi
from stages_of_inference.backends import hooked_fast as fastpath
from stages_of_inference.backends.hooked_fast import fast_block, fast_path_blocker
from stages_of_inference.interventions.executor import block_count, evaluate, evaluate_plans
from stages_of_inference.interventions.options import STACK_TOKENS_CPU, EngineOptions
from stages_of_inference.interventions.unembed import row_max

METRICS = ["kl_nats", "loss", "accuracy", "top1_agreement", "entropy_bits", "confidence"]


def _residual(model: HookedTransformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.input_to_embed(tokens)[0]


def _assert_block_equal(model: HookedTransformer, tokens: torch.Tensor, rtol: float = 2e-6) -> None:
    x = _residual(model, tokens)
    with torch.inference_mode():
        for layer, block in enumerate(model.blocks):
            assert fast_path_blocker(model, block, tokens.shape[1]) is None, layer
            want = block(x)
            got = fast_block(model, block, x)
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= rtol * scale, (layer, (got - want).abs().max().item(), scale)
            x = want


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_block_equals_the_block(family: str, tiny_tokens: torch.Tensor) -> None:
    _assert_block_equal(make_tiny_model(family), tiny_tokens)


@pytest.mark.parametrize(("family", "variant"), [
    ("parallel", {"rotary_adjacent_pairs": True}),  # GPT-J pairs, partial rotary
    ("gpt2", {"attn_only": True}),
    ("llama", {"use_attn_scale": False}),
])
def test_fast_block_variants(family: str, variant: dict, tiny_tokens: torch.Tensor) -> None:
    cfg = tiny_config(family).to_dict()
    cfg.update(variant)
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(**cfg))
    for p in model.parameters():  # non-zero biases everywhere, as real checkpoints have
        torch.nn.init.normal_(p, std=0.3)
    model.eval()
    _assert_block_equal(model, tiny_tokens)


@pytest.mark.real
def test_fast_block_equals_the_block_on_the_real_model(real_model: HookedTransformer, real_tokens: torch.Tensor) -> None:
    _assert_block_equal(real_model, real_tokens[:2], rtol=1e-6)


def test_blockers(tiny_models: dict[str, HookedTransformer]) -> None:
    model = tiny_models["gpt2"]
    block = model.blocks[1]
    handle = block.hook_mlp_out.add_hook(lambda x, hook: x)
    try:
        assert "hook" in fast_path_blocker(model, block, 8)
        assert fast_path_blocker(model, model.blocks[0], 8) is None
    finally:
        model.reset_hooks()
    del handle
    assert fast_path_blocker(model, block, 8) is None

    for change, word in [
        ({"attn_scores_soft_cap": 30.0}, "soft-capped"),
        ({"use_attn_result": True}, "use_attn_result"),
        ({"positional_embedding_type": "shortformer"}, "shortformer"),
        ({"act_fn": "solu_ln"}, "layer norm"),
    ]:
        cfg = tiny_config("gpt2").to_dict()
        cfg.update(change)
        other = HookedTransformer(HookedTransformerConfig(**cfg))
        reason = fast_path_blocker(other, other.blocks[0], 8)
        assert reason is not None and word in reason, (change, reason)

    cfg = tiny_config("llama").to_dict()
    cfg.update(use_local_attn=True, attn_types=["global", "local", "global", "local"], window_size=4)
    gemma_like = HookedTransformer(HookedTransformerConfig(**cfg))
    assert fast_path_blocker(gemma_like, gemma_like.blocks[0], 8) is None
    assert "local" in fast_path_blocker(gemma_like, gemma_like.blocks[1], 8)

    rotary = tiny_models["llama"]
    assert "rotary" in fast_path_blocker(rotary, rotary.blocks[0], rotary.blocks[0].attn.rotary_cos.shape[0] + 1)


def test_fast_block_refuses_what_it_does_not_reproduce(tiny_models: dict[str, HookedTransformer]) -> None:
    model = tiny_models["gpt2"]
    x = _residual(model, torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="d_model=32"):
        fast_block(model, model.blocks[0], x[..., :31])
    cfg = tiny_config("gpt2").to_dict()
    cfg.update(attn_scores_soft_cap=30.0)
    capped = HookedTransformer(HookedTransformerConfig(**cfg))
    with pytest.raises(ValueError, match="soft-capped"):
        fast_block(capped, capped.blocks[0], x)


def _plans(n: int) -> list[soi.LayerPlan]:
    return ([soi.LayerPlan.drop(n, i) for i in range(n)] + [soi.LayerPlan.swap(n, i) for i in range(n - 1)]
            + [soi.LayerPlan.repeat(n, [1]), soi.LayerPlan.permute(n, list(reversed(range(n))))])


@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_uses_the_fast_path_and_agrees(family: str, tiny_tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tiny_model(family)
    plans = _plans(model.cfg.n_layers)
    calls: list[int] = []  # the number of sequences of each fast block call

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(args[2].shape[0])
        return fast_block(*args, **kwargs)  # the original

    monkeypatch.setattr(fastpath, "fast_block", counting)
    n_seq = tiny_tokens.shape[0]
    n_batches = -(-n_seq // 2)
    # one plan at a time: a stack of 47 token positions holds no two batches of 2 x 24 (nor of
    # 1 x 24, the last one)
    single = evaluate_plans(model, tiny_tokens, plans, progress=False, batch_size=2, stack_tokens=47)
    assert len(calls) == block_count(plans) * n_batches  # every block of every batch, trunk included
    assert max(calls) == 2
    calls.clear()
    # plans stacked (the default): every block still runs once per sequence, in fewer calls
    fast = evaluate_plans(model, tiny_tokens, plans, progress=False, batch_size=2)
    assert sum(calls) == block_count(plans) * n_seq
    assert len(calls) < block_count(plans) * n_batches and max(calls) > 2
    calls.clear()
    # two plans per stack (96 = 2 x 48 positions), windows of four plan ends: the residuals a
    # later window shares are carried over, none is computed twice
    pairs = evaluate_plans(model, tiny_tokens, plans, progress=False, batch_size=2, stack_tokens=96)
    assert sum(calls) == block_count(plans) * n_seq
    assert max(calls) == 4
    calls.clear()
    slow = evaluate_plans(model, tiny_tokens, plans, progress=False, batch_size=2, fast_path=False)
    assert not calls
    for other in (single, pairs, slow):
        diff = (fast[METRICS] - other[METRICS]).abs().to_numpy().max()
        assert diff < 1e-5, diff
    assert (fast["kl_nats"] > 1e-3).sum() >= model.cfg.n_layers  # the plans do change the output


def test_a_hooked_block_runs_as_itself(tiny_tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A permanent hook on one block: that block runs through TransformerLens (the hook fires and
    edits), the others by the fast path; the numbers equal a sweep without the fast path."""
    model = make_tiny_model("llama")
    plans = _plans(model.cfg.n_layers)
    plain = evaluate_plans(model, tiny_tokens, plans, progress=False)
    fired = []

    def zero_mlp(x: torch.Tensor, hook: object) -> torch.Tensor:
        fired.append(1)
        return torch.zeros_like(x)

    model.blocks[2].hook_mlp_out.add_hook(zero_mlp)
    try:
        calls = []

        def counting(*args: object, **kwargs: object) -> torch.Tensor:
            calls.append(args[1])
            return fast_block(*args, **kwargs)

        monkeypatch.setattr(fastpath, "fast_block", counting)
        hooked = evaluate_plans(model, tiny_tokens, plans, progress=False)
        assert fired and calls and all(block is not model.blocks[2] for block in calls)
        reference = evaluate_plans(model, tiny_tokens, plans, progress=False, fast_path=False)
    finally:
        model.reset_hooks(including_permanent=True)
    assert (hooked[METRICS] - reference[METRICS]).abs().to_numpy().max() < 1e-5
    assert (hooked[METRICS] - plain[METRICS]).abs().to_numpy().max() > 1e-2  # the hook mattered


def test_caller_hooks_turn_the_fast_path_off(tiny_tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_tiny_model("gpt2")
    calls = []
    monkeypatch.setattr(fastpath, "fast_block", lambda *a, **k: calls.append(1) or fast_block(*a, **k))
    hooks = [("blocks.0.hook_resid_pre", lambda x, hook: x)]
    evaluate_plans(model, tiny_tokens, _plans(model.cfg.n_layers), progress=False, fwd_hooks=hooks)
    assert not calls


def test_unembedding_by_vocabulary_blocks(tiny_tokens: torch.Tensor) -> None:
    """The sweep unembeds ``unembed_block`` columns at a time; a block size that does not divide
    the vocabulary (101 = 6 x 16 + 5) gives the numbers of a single block, and of the model's forward."""
    model = make_tiny_model("llama")
    plans = _plans(model.cfg.n_layers)
    whole = evaluate_plans(model, tiny_tokens, plans, progress=False, fast_path=False)
    blocked = evaluate(model, tiny_tokens, plans, progress=False, fast_path=False, unembed_block=16)
    assert (blocked.summary[METRICS] - whole[METRICS]).abs().to_numpy().max() < 1e-6
    with torch.inference_mode():
        logits = model(tiny_tokens)
    original = soi.metrics.sequence_metrics(logits, tiny_tokens)
    assert abs(blocked.reference["loss"] - float(original["loss"].double().mean())) < 1e-6


@pytest.mark.parametrize("stack_tokens", [96, 1024])
def test_stacked_plans_give_the_per_token_numbers_of_single_plans(stack_tokens: int, tiny_tokens: torch.Tensor) -> None:
    """Stacking plans (and reducing their logits together, in chunks that straddle plans) gives
    every plan's own per-token numbers, those of the fast path one plan at a time (47 positions
    hold a single batch: no stacking)."""
    model = make_tiny_model("llama")
    plans = _plans(model.cfg.n_layers)
    kwargs = dict(progress=False, batch_size=2, chunk_tokens=7, per_token=True)
    _, alone = evaluate_plans(model, tiny_tokens, plans, stack_tokens=47, **kwargs)
    _, stacked = evaluate_plans(model, tiny_tokens, plans, stack_tokens=stack_tokens, **kwargs)
    keys = ["plan", "sequence", "position"]
    alone, stacked = alone.sort_values(keys, ignore_index=True), stacked.sort_values(keys, ignore_index=True)
    assert len(alone) == len(stacked) == len(plans) * tiny_tokens.shape[0] * (tiny_tokens.shape[1] - 2)
    assert (alone[keys + ["token", "top1", "top1_original"]] == stacked[keys + ["token", "top1", "top1_original"]]).all().all()
    for column in ("kl_nats", "loss", "entropy_bits", "confidence"):
        assert ((alone[column] - stacked[column]).abs() / (1 + alone[column].abs())).max() < 1e-6, column


def test_stack_tokens_is_checked(tiny_tokens: torch.Tensor) -> None:
    model = make_tiny_model("gpt2")
    for bad in (0, -5, True):  # (a float or a string is refused too; under the tests' type checks, earlier)
        with pytest.raises(ValueError, match="stack_tokens must be a positive number of token positions"):
            evaluate_plans(model, tiny_tokens, _plans(model.cfg.n_layers), progress=False, stack_tokens=bad)
        with pytest.raises(ValueError, match="stack_tokens"):
            soi.robustness_sweep(model, tiny_tokens, progress=False, stack_tokens=bad)
    assert EngineOptions().stack_tokens_for(model.cfg.device) == STACK_TOKENS_CPU
    with pytest.raises(ValueError, match="give either options or its fields as keywords"):
        evaluate_plans(model, tiny_tokens, _plans(model.cfg.n_layers), EngineOptions(), progress=False)
    with pytest.raises(ValueError, match=r"unknown engine setting\(s\) \['batchsize'\]"):
        evaluate_plans(model, tiny_tokens, _plans(model.cfg.n_layers), batchsize=2)


def test_row_max_from_block_maxima() -> None:
    """The largest logit and its first index, found from the per-block maxima, equal
    Tensor.max(dim): ties within a block and across blocks, the maximum in the short last block."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 101, generator=gen)
    logits[1, 99] = 9.0  # in the last block (96..100)
    logits[2, [20, 70]] = 9.0  # a tie across blocks: the first wins
    logits[3, [33, 35]] = 9.0  # a tie within a block
    logits[4] = 1.0  # every logit equal
    logits[5, [15, 16]] = 9.0  # the tie straddles a block boundary
    block_max = torch.stack([logits[:, v0 : v0 + 16].amax(dim=1) for v0 in range(0, 101, 16)])
    top, top1 = row_max(logits, block_max, 16)
    want = logits.max(dim=-1)
    assert torch.equal(top, want.values) and torch.equal(top1, want.indices)
    assert top1.tolist()[1:] == [99, 20, 33, 0, 15]


def test_a_hook_on_the_unembedding_is_respected(tiny_tokens: torch.Tensor) -> None:
    """A PyTorch hook attached to ``model.unembed`` runs in the sweep: here it flattens every
    distribution, so the loss is log(d_vocab) and no plan differs from the reference."""
    model = make_tiny_model("llama")
    plans = _plans(model.cfg.n_layers)
    handle = model.unembed.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    try:
        result = evaluate(model, tiny_tokens, plans, progress=False)
    finally:
        handle.remove()
    df = result.summary
    assert abs(result.reference["loss"] - math.log(model.cfg.d_vocab)) < 1e-5
    assert df["kl_nats"].abs().max() < 1e-6
    assert (evaluate_plans(model, tiny_tokens, plans, progress=False)["kl_nats"] > 1e-3).any()
