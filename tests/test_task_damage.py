"""Task-level damage (stages.task_damage) against literal greedy decoding: the model run step by step,
one new token at a time, with the authors' deletion (zeroed attention and MLP outputs) or the
authors' swap (weights exchanged and the model rebuilt)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

import stages_of_inference as soi
from stages_of_inference.interventions.hooks import drop_layer
from stages_of_inference.stages import task_damage as td
from tests.authors import weight_swapped


def _runner(model: HookedTransformer, kind: str, layer: int | None):
    """The unmodified, deleted or swapped model as a function of tokens -> logits, the authors' way."""
    if kind == "drop":
        return lambda t: model.run_with_hooks(t, fwd_hooks=drop_layer(model, layer))
    if kind == "swap":
        return weight_swapped(model, layer)
    return model


def _greedy(run, tokens: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.cat([tokens, run(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[:, -steps:]


CASES = [("none", None), ("drop", 0), ("drop", 2), ("swap", 1)]


def _plan(n: int, kind: str, layer: int | None) -> soi.LayerPlan:
    return {"none": lambda: soi.LayerPlan.identity(n), "drop": lambda: soi.LayerPlan.drop(n, layer),
            "swap": lambda: soi.LayerPlan.swap(n, layer)}[kind]()


def test_generation_check_equals_greedy_decoding(tiny_model: HookedTransformer, tiny_tokens: torch.Tensor) -> None:
    prompts, steps = tiny_tokens[:, :10], 6
    n = tiny_model.cfg.n_layers
    df = td.generation_check(tiny_model, prompts, [_plan(n, k, i) for k, i in CASES], new_tokens=steps, batch_size=2,
                             progress=False)
    twice = td.generation_check(tiny_model, prompts, [_plan(n, "drop", 2), _plan(n, "drop", 2)], new_tokens=steps,
                                progress=False)  # a plan given twice is computed once and reported twice
    assert twice["shared_tokens"].tolist() == [df["shared_tokens"].iloc[2]] * 2
    reference = _greedy(tiny_model, prompts, steps)
    for row, (kind, layer) in zip(df.itertuples(), CASES):
        own = _greedy(_runner(tiny_model, kind, layer), prompts, steps)
        same = (own == reference).int()
        shared = same.cumprod(dim=1).sum(dim=1).double()  # leading tokens equal to the unmodified model's
        assert row.shared_tokens == pytest.approx(float(shared.mean())), (kind, layer)
        assert row.all_shared == pytest.approx(float((shared == steps).double().mean()))
    assert df["shared_tokens"].iloc[0] == steps


@pytest.mark.real
def test_cloze_equals_greedy_decoding_on_the_real_model(real_model: HookedTransformer) -> None:
    items = td.cloze_items(soi.data.corpus_texts("austen"), n_items=12, seed=1)
    n = real_model.cfg.n_layers
    cases = [("none", None), ("drop", 0), ("drop", 15), ("swap", 14)]
    df = td.cloze_scores(real_model, items, [_plan(n, k, i) for k, i in cases], context_tokens=24, progress=False)
    encoded = td._encode_items(real_model, items, 24)
    for row, (kind, layer) in zip(df.itertuples(), cases):
        run = _runner(real_model, kind, layer)
        right = 0
        for sequence, pieces in encoded:
            prompt = torch.tensor([sequence[:-pieces]])
            right += bool((_greedy(run, prompt, pieces)[0] == torch.tensor(sequence[-pieces:])).all())
        assert row.cloze_accuracy == pytest.approx(right / len(items)), (kind, layer)
    assert df["cloze_accuracy"].iloc[0] > 0  # SmolLM2 finishes some sentences of Austen
    assert df["cloze_accuracy"].iloc[1] < df["cloze_accuracy"].iloc[0]  # without block 0 it finishes fewer


def test_items_from_text_are_deterministic_and_files_are_checked(tmp_path) -> None:
    text = " ".join(f"Sentence number {i} talks about the weather today." for i in range(200))
    a, b = td.cloze_items(text, n_items=5, seed=3), td.cloze_items(text, n_items=5, seed=3)
    assert a == b and len(a) == 5 and all(answer == "today" for _, answer in a)
    assert td.cloze_items(text, n_items=5, seed=4) != a
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps({"context": c, "answer": w}) for c, w in a) + "\n")
    assert td.load_cloze_items(path) == a
    path.write_text('{"context": "x"}\n')
    with pytest.raises(ValueError, match=r'items.jsonl:1 must be an object with non-empty string fields "context" and "answer"'):
        td.load_cloze_items(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"items.jsonl:1 is not JSON"):
        td.load_cloze_items(path)
    with pytest.raises(ValueError, match="no sentence-final word"):
        td.cloze_items("no sentence ends here", n_items=2)


def test_bad_items_and_prompts_are_refused(tiny_model: HookedTransformer) -> None:
    plans = [soi.LayerPlan.identity(tiny_model.cfg.n_layers)]
    with pytest.raises(ValueError, match=r"a cloze item must be a \(context, answer\) pair"):
        td.cloze_scores(tiny_model, [("context only", " ")], plans, progress=False)
    with pytest.raises(ValueError, match="exceed the context"):
        td.generation_check(tiny_model, torch.zeros(1, 30, dtype=torch.long), plans, new_tokens=16, progress=False)


def test_task_damage_table(tiny_tokens: torch.Tensor) -> None:
    from tests.test_report import _tiny

    model = _tiny("tiny-gpt2", "gpt2")
    items = [(" ".join(f"w{i + j}" for j in range(8)), f"w{i + 8}") for i in range(6)]
    df = td.task_damage(model, items, tiny_tokens[:3, :8], new_tokens=4, progress=False)
    n = model.cfg.n_layers
    assert df["kind"].tolist() == ["none"] + ["drop"] * n + ["swap"] * (n - 1)
    assert df["generation_retained"].iloc[0] == 1.0
    base = df["token_accuracy"].iloc[0]  # a random model may get no token right: then nothing is "retained"
    np.testing.assert_allclose(df["token_retained"], df["token_accuracy"] / base if base > 0 else np.nan)
    np.testing.assert_allclose(df["generation_retained"], df["shared_tokens"] / 4)
    assert df.attrs["provenance"]["settings"]["analysis"] == "task_damage"


def test_task_damage_with_a_sweeps_token_accuracy(tiny_tokens: torch.Tensor) -> None:
    """Given a sweep, only the answers are scored: the cloze numbers equal those of the run that
    scores every position, and the token-level columns are the sweep's accuracy."""
    from stages_of_inference.robustness import robustness_sweep
    from tests.test_report import _tiny

    model = _tiny("tiny-gpt2", "gpt2")
    items = [(" ".join(f"w{i + j}" for j in range(8 + i % 3)), f"w{i + 8}") for i in range(6)]  # three lengths
    prompts = tiny_tokens[:3, :8]
    full = td.task_damage(model, items, prompts, new_tokens=4, progress=False)
    sweep = robustness_sweep(model, tiny_tokens, progress=False).summary
    cheap = td.task_damage(model, items, prompts, new_tokens=4, progress=False, token_level=sweep)
    for column in ("cloze_accuracy", "shared_tokens", "all_shared"):
        np.testing.assert_array_equal(cheap[column], full[column])
    np.testing.assert_allclose(cheap["token_accuracy"], sweep["accuracy"], rtol=0, atol=0)
    assert "given sweep" in cheap.attrs["provenance"]["settings"]["token_level"]
    with pytest.raises(ValueError, match="token_level lacks 3 of the plans"):
        td.task_damage(model, items, prompts, new_tokens=4, progress=False, token_level=sweep[sweep["kind"] != "swap"])


def test_the_study_runs_the_task_analysis_from_a_cloze_file(tmp_path, corpus) -> None:
    from stages_of_inference.study import run_study
    from tests.test_report import _config, _tiny

    model = _tiny("tiny-gpt2", "gpt2")
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps({"context": " ".join(f"w{(i + j) % 90}" for j in range(12)),
                                           "answer": f"w{(i + 12) % 90}"}) for i in range(10)) + "\n")
    config = _config(corpus, ("tiny-gpt2",), analyses=("robustness", "task"), cloze_file=str(items),
                     generation_prompts=2)
    study = run_study(model, config=config, out_dir=tmp_path / "s", progress=False, log=None)
    table = study.results["tiny-gpt2"]["task"]["task"]
    assert int(table["n_items"].iloc[0]) == 10 and int(table["n_prompts"].iloc[0]) == 2
    page = study.report.read_text()
    assert "id='task_damage'" in page and study.readings["task_damage"].count("cloze") >= 2
    # another item file is another analysis: recomputed, not reused
    items.write_text(items.read_text().replace('"answer": "w12"', '"answer": "w13"'))
    again = run_study(model, config=config, out_dir=tmp_path / "s", progress=False, log=None, write_report=False)
    assert ("tiny-gpt2", "task") not in again.reused and ("tiny-gpt2", "robustness") in again.reused
