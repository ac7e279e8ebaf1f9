"""The deletion / swap sweep: columns, equivalence with the authors' methods, save/load, resume,
and the paper's signature on the real model."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer

from stages_of_inference.interventions import executor
from stages_of_inference.interventions.hooks import drop_layer
from stages_of_inference.robustness import PER_TOKEN_COLUMNS, SUMMARY_COLUMNS, SweepResult, robustness_sweep
from tests.authors import weight_swapped

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def authors_metrics(model: HookedTransformer, tokens: torch.Tensor, kind: str, layer: int,
                    base: torch.Tensor | None = None) -> dict[str, float]:
    """KL, loss and accuracy of one intervention done the authors' way, metrics computed directly."""
    if base is None:
        base = model(tokens)
    if kind == "drop":
        logits = model.run_with_hooks(tokens, fwd_hooks=drop_layer(model, layer))
    else:
        logits = weight_swapped(model, layer)(tokens)
    return exact_scores(logits, tokens, base)


def exact_scores(logits: torch.Tensor, tokens: torch.Tensor, base: torch.Tensor) -> dict[str, float]:
    """KL, loss, accuracy and agreement of ``logits`` against ``base`` on the scored positions,
    the arithmetic in float64 on the given (fp32) logits.

    Scoring in fp32, as the authors' code does, is itself off by up to ~1.3e-4 nats of mean KL on
    SmolLM2 when block 0 is deleted (the logits are then large, and fp32 log_softmax rounds them);
    the sweep reduces in float64 and lands within ~3e-7 of this. The interventions compared are
    the authors' (hook zeroing, weight swap and rebuild); only the scoring is exact."""
    keep = slice(1, tokens.shape[1] - 1)
    targets = tokens[:, 2:]
    lp = logits[:, keep].double().log_softmax(-1)
    ref_lp = base[:, keep].double().log_softmax(-1)
    top1 = logits[:, keep].float().max(-1).indices  # ties broken as the library does, on the fp32 logits
    ref_top1 = base[:, keep].float().max(-1).indices
    return {"kl_nats": float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean()),
            "loss": float(-lp.gather(-1, targets.unsqueeze(-1)).mean()),
            "accuracy": float((top1 == targets).double().mean()),
            "top1_agreement": float((top1 == ref_top1).double().mean())}


def test_summary_has_exactly_the_design_columns(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    n = tiny_model.cfg.n_layers
    result = robustness_sweep(tiny_model, tiny_tokens, progress=False)
    s = result.summary
    assert tuple(s.columns) == SUMMARY_COLUMNS
    assert s["kind"].tolist() == ["none"] + ["drop"] * n + ["swap"] * (n - 1)
    none = s[s["kind"] == "none"].iloc[0]
    assert pd.isna(none["layer"]) and np.isnan(none["relative_depth"])
    assert none["kl_nats"] == 0 and none["loss_delta"] == 0 and none["top1_agreement"] == 1
    drops = s[s["kind"] == "drop"]
    assert drops["layer"].tolist() == list(range(n))
    assert drops["relative_depth"].tolist() == [i / (n - 1) for i in range(n)]
    assert (s["n_tokens"] == tiny_tokens.shape[0] * (tiny_tokens.shape[1] - 2)).all()
    assert result.per_token is None
    assert result.provenance["settings"]["kinds"] == ["drop", "swap"]
    assert robustness_sweep(tiny_model, tiny_tokens, kinds=("swap",), progress=False).summary["kind"].tolist() == ["none"] + ["swap"] * (n - 1)


def test_sweep_equals_the_authors_methods(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    s = robustness_sweep(tiny_model, tiny_tokens, batch_size=2, chunk_tokens=16, progress=False).summary
    base = tiny_model(tiny_tokens)
    for row in s[s["kind"] != "none"].itertuples():
        expected = authors_metrics(tiny_model, tiny_tokens, row.kind, int(row.layer), base)
        for key, value in expected.items():
            assert abs(getattr(row, key) - value) <= ATOL, (row.kind, row.layer, key)


def test_per_token_table(tiny_models: dict[str, HookedTransformer], tiny_tokens: torch.Tensor) -> None:
    model = tiny_models["parallel"]
    result = robustness_sweep(model, tiny_tokens, per_token=True, batch_size=3, progress=False)
    tok = result.per_token
    assert tok is not None and tuple(tok.columns) == PER_TOKEN_COLUMNS
    n_rows = tiny_tokens.shape[0] * (tiny_tokens.shape[1] - 2)
    assert len(tok) == len(result.summary) * n_rows
    # the per-token rows average to the summary
    means = tok.assign(layer=tok["layer"].fillna(-1)).groupby(["kind", "layer"])["kl_nats"].mean()
    for row in result.summary.fillna({"layer": -1}).itertuples():
        assert abs(means.loc[(row.kind, row.layer)] - row.kl_nats) <= ATOL
    drop1 = tok[(tok["kind"] == "drop") & (tok["layer"] == 1)]
    assert np.allclose(drop1["loss_delta"], drop1["loss"] - drop1["loss_original"], atol=1e-6)


def test_save_and_load_round_trip(tiny_models: dict[str, HookedTransformer], tiny_tokens: torch.Tensor, tmp_path) -> None:
    result = robustness_sweep(tiny_models["gpt2"], tiny_tokens, per_token=True, progress=False)
    for fmt in ("parquet", "csv"):
        folder = result.save(tmp_path / fmt, fmt=fmt)
        back = SweepResult.load(folder)
        pd.testing.assert_frame_equal(back.summary, result.summary, check_dtype=fmt == "parquet", check_exact=fmt == "parquet")
        assert back.per_token is not None and len(back.per_token) == len(result.per_token)
        assert back.provenance["settings"]["fingerprint"] is None
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pickle"))


class Interrupted(RuntimeError):
    pass


def _interrupt_after_first_batch(monkeypatch: pytest.MonkeyPatch, sweep: Any) -> None:
    """Run ``sweep`` with every batch after the first one crashing (the first sequence of a batch
    is the engine's third argument), then restore the engine."""
    original = executor._run_batch

    def failing(*args: Any, **kwargs: Any) -> Any:
        if args[2] > 0:
            raise Interrupted("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(executor, "_run_batch", failing)
    with pytest.raises(Interrupted):
        sweep()
    monkeypatch.setattr(executor, "_run_batch", original)


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_models: dict[str, HookedTransformer], tiny_tokens: torch.Tensor, tmp_path, monkeypatch) -> None:
    model = tiny_models["llama"]
    full = robustness_sweep(model, tiny_tokens, per_token=True, batch_size=2, progress=False)
    original = executor._run_batch
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first batch finishes, the second is interrupted
            raise Interrupted("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(executor, "_run_batch", failing)
    out = tmp_path / "sweep"
    with pytest.raises(Interrupted):
        robustness_sweep(model, tiny_tokens, per_token=True, batch_size=2, progress=False, out_dir=out)
    done = sorted(p.name for p in (out / "checkpoint").glob("batch_*.sums.parquet"))
    assert done == ["batch_00000.sums.parquet"]
    assert not list(out.rglob("*.tmp"))  # nothing half-written

    calls["n"] = 10  # no more failures; count the batches the rerun computes
    resumed = robustness_sweep(model, tiny_tokens, per_token=True, batch_size=2, progress=False, out_dir=out)
    assert calls["n"] == 10 + 2  # batches 1 and 2 only (5 sequences in batches of 2)
    pd.testing.assert_frame_equal(resumed.summary, full.summary, check_exact=True)
    pd.testing.assert_frame_equal(resumed.per_token, full.per_token, check_exact=True)
    # the finished folder holds the result; a third run loads it without computing anything
    assert (out / "provenance.json").exists() and not (out / "checkpoint").exists()
    again = robustness_sweep(model, tiny_tokens, per_token=True, batch_size=2, progress=False, out_dir=out)
    assert calls["n"] == 12
    pd.testing.assert_frame_equal(again.summary, full.summary, check_exact=True)


def test_a_mismatching_checkpoint_is_refused(tiny_models: dict[str, HookedTransformer], tiny_tokens: torch.Tensor, tmp_path, monkeypatch) -> None:
    model = tiny_models["gpt2"]
    out = tmp_path / "sweep"
    _interrupt_after_first_batch(monkeypatch, lambda: robustness_sweep(model, tiny_tokens, batch_size=2, progress=False,
                                                                       out_dir=out))
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    assert manifest["batch_size"] == 2
    with pytest.raises(ValueError, match="different sweep.*batch_size"):
        robustness_sweep(model, tiny_tokens, batch_size=3, progress=False, out_dir=out)
    other = tiny_tokens.clone()
    other[0, 5] += 1
    with pytest.raises(ValueError, match="tokens_sha256"):
        robustness_sweep(model, other, batch_size=2, progress=False, out_dir=out)
    with pytest.raises(ValueError, match="model_weights_hash"):
        robustness_sweep(tiny_models["parallel"], tiny_tokens, batch_size=2, progress=False, out_dir=out)
    # a finished result is refused too, when the settings differ
    robustness_sweep(model, tiny_tokens, batch_size=2, progress=False, out_dir=out)
    with pytest.raises(ValueError, match="kinds"):
        robustness_sweep(model, tiny_tokens, kinds=("drop",), batch_size=2, progress=False, out_dir=out)


def test_bad_inputs(tiny_models: dict[str, HookedTransformer], tiny_tokens: torch.Tensor, tmp_path) -> None:
    model = tiny_models["gpt2"]
    with pytest.raises(ValueError, match="unknown sweep kind.*allowed: drop, swap"):
        robustness_sweep(model, tiny_tokens, kinds=("delete",), progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        robustness_sweep(model, tiny_tokens, progress=False, out_dir=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(TypeError, match="HookedTransformer"):
        robustness_sweep("gpt2", tiny_tokens, progress=False)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def few_real_tokens(real_tokens: torch.Tensor) -> torch.Tensor:
    """2 x 128 tokens of the bundled text (252 scored positions): enough for the signature, and
    quick on a 2-core CPU."""
    return real_tokens[:2]


@pytest.fixture(scope="module")
def real_sweep(real_model: HookedTransformer, few_real_tokens: torch.Tensor) -> SweepResult:
    return robustness_sweep(real_model, few_real_tokens, progress=False)


@pytest.mark.real
def test_real_model_shows_the_papers_signature(real_sweep: SweepResult, real_model: HookedTransformer) -> None:
    s = real_sweep.summary
    n = real_model.cfg.n_layers
    drops = s[s["kind"] == "drop"].set_index("layer")["loss_delta"]
    third = n // 3
    first, middle, last = drops.iloc[:third], drops.iloc[third : n - third], drops.iloc[n - third :]
    assert drops.loc[0] > middle.max(), "deleting block 0 must cost more loss than any middle block"
    assert middle.mean() < first.mean() and middle.mean() < last.mean()
    swaps = s[s["kind"] == "swap"]
    assert (swaps["relative_accuracy"].iloc[third : n - third] > 0.8).all()


@pytest.mark.real
def test_real_model_sweep_equals_the_authors_methods(real_sweep: SweepResult, real_model: HookedTransformer, few_real_tokens: torch.Tensor) -> None:
    s = real_sweep.summary
    n = real_model.cfg.n_layers
    base = real_model(few_real_tokens)
    for kind, layer in [("drop", 0), ("drop", n // 2), ("drop", n - 1), ("swap", 0), ("swap", n // 2), ("swap", n - 2)]:
        row = s[(s["kind"] == kind) & (s["layer"] == layer)].iloc[0]
        expected = authors_metrics(real_model, few_real_tokens, kind, layer, base)
        for key, value in expected.items():
            assert abs(row[key] - value) <= ATOL, (kind, layer, key, row[key], value)


def test_standard_errors_are_those_of_the_per_sequence_means(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    """Every ``<metric>_sem`` of the summary equals the standard error over sequences of the
    per-sequence means, computed here from the per-token table (the sweep computes it from its
    per-sequence sums, with or without a per-token table)."""
    result = robustness_sweep(tiny_model, tiny_tokens, per_token=True, batch_size=2, progress=False)
    plain = robustness_sweep(tiny_model, tiny_tokens, batch_size=2, progress=False).summary
    tok = result.per_token.copy()
    ref_acc = float(result.summary.loc[result.summary["kind"] == "none", "accuracy"].iloc[0])
    tok["layer"] = tok["layer"].fillna(-1)
    columns = ["kl_nats", "loss", "loss_delta", "correct", "agree", "entropy_bits"]
    tok[columns] = tok[columns].astype(np.float64)  # the fp32 per-token numbers, averaged in float64
    per_seq = tok.groupby(["kind", "layer", "sequence"])[columns].mean()
    n_seq = tiny_tokens.shape[0]
    for _, row in result.summary[result.summary["kind"] != "none"].iterrows():
        seq = per_seq.loc[(row["kind"], row["layer"])]
        relative = 1 / ref_acc if ref_acc > 0 else float("nan")  # no accuracy to retain: NaN, as the mean
        for metric, column, scale in (("kl_nats", "kl_nats", 1), ("loss", "loss", 1), ("loss_delta", "loss_delta", 1),
                                      ("accuracy", "correct", 1), ("relative_accuracy", "correct", relative),
                                      ("top1_agreement", "agree", 1), ("entropy_bits", "entropy_bits", 1)):
            want = seq[column].astype(float).std(ddof=1) / np.sqrt(n_seq) * scale
            assert row[f"{metric}_sem"] == pytest.approx(want, rel=1e-6, abs=1e-12, nan_ok=True), (row["kind"], row["layer"], metric)
    pd.testing.assert_frame_equal(plain, result.summary)


def test_an_altered_checkpoint_batch_is_computed_again(tiny_models: dict[str, HookedTransformer], tiny_tokens: torch.Tensor,
                                                      tmp_path, monkeypatch) -> None:
    """A finished batch whose file was changed after it was written no longer counts as done: the
    resumed sweep recomputes it (with a warning) and ends with the numbers of an uninterrupted run."""
    model = tiny_models["gpt2"]
    full = robustness_sweep(model, tiny_tokens, batch_size=2, progress=False)
    out = tmp_path / "sweep"
    _interrupt_after_first_batch(monkeypatch, lambda: robustness_sweep(model, tiny_tokens, batch_size=2, progress=False,
                                                                       out_dir=out))
    sums = out / "checkpoint" / "batch_00000.sums.parquet"
    table = pd.read_parquet(sums)
    table["loss_sum"] *= 1.3
    table.to_parquet(sums, index=False)
    with pytest.warns(UserWarning, match="checkpoint batch 0 .* is damaged"):
        resumed = robustness_sweep(model, tiny_tokens, batch_size=2, progress=False, out_dir=out)
    pd.testing.assert_frame_equal(resumed.summary, full.summary, check_exact=True)


def _zeroed_run(model: HookedTransformer, tokens: torch.Tensor, blocks: range) -> torch.Tensor:
    """The authors' deletion of several blocks, written out: every block's attention and MLP outputs zeroed."""
    def zero(value: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(value)
    hooks = [(f"blocks.{i}.{name}", zero) for i in blocks for name in ("hook_attn_out", "hook_mlp_out")]
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


def test_contiguous_deletions_equal_zeroing_every_block_of_the_run(tiny_model: HookedTransformer,
                                                                   tiny_tokens: torch.Tensor) -> None:
    from stages_of_inference.robustness import run_table
    s = robustness_sweep(tiny_model, tiny_tokens, kinds=["drop_2", "drop_3"], batch_size=2, progress=False).summary
    runs = run_table(s, tiny_model.cfg.n_layers)
    assert runs[["k", "start"]].values.tolist() == [[2, 0], [2, 1], [2, 2], [3, 0], [3, 1]]
    base = tiny_model(tiny_tokens)
    for row in runs.itertuples():
        expected = exact_scores(_zeroed_run(tiny_model, tiny_tokens, range(row.start, row.end + 1)), tiny_tokens, base)
        assert abs(row.kl_nats - expected["kl_nats"]) <= ATOL, (row.k, row.start)
        assert row.kl_nats > 1e-3  # the runs do change the model


def test_run_kinds_are_checked_against_the_model(tiny_models: dict[str, HookedTransformer], tiny_tokens: torch.Tensor) -> None:
    model = tiny_models["gpt2"]
    for kinds, message in [(["drop_4"], "delete all 4 blocks"), (["drop_1"], "unknown sweep kind"),
                           (["drop_x"], "unknown sweep kind"), (["drop_2", "drop_2"], "listed twice")]:
        with pytest.raises(ValueError, match=message):
            robustness_sweep(model, tiny_tokens, kinds=kinds, progress=False)
