"""One model used from several threads: the library's entry points take turns on the model (a
per-model lock, :mod:`stages_of_inference.backends.state`), so each analysis gives the numbers it
gives alone, bit for bit."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import torch

import stages_of_inference as soi
from stages_of_inference.stages import detokenization as detok
from stages_of_inference.stages import feature_engineering as fe
from stages_of_inference.stages import sinks
from tests.conftest import make_tiny_model


def _sweep(model, tokens) -> pd.DataFrame:  # noqa: ANN001
    return soi.robustness_sweep(model, tokens, kinds=("drop_attention", "drop_mlp"), progress=False).summary


def _lens(model, tokens) -> pd.DataFrame:  # noqa: ANN001
    return fe.logit_lens(model, tokens, progress=False)


def _attention(model, tokens) -> pd.DataFrame:  # noqa: ANN001
    return detok.previous_token_attention(model, tokens, progress=False)


def _sinks(model, tokens) -> pd.DataFrame:  # noqa: ANN001
    return sinks.sink_profile(model, tokens, progress=False)


def _same(a: pd.DataFrame, b: pd.DataFrame, what: str) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True, obj=what)


def test_a_sweep_and_the_lens_in_two_threads_give_their_single_thread_numbers(tiny_tokens: torch.Tensor) -> None:
    model = make_tiny_model("llama")
    alone = {"sweep": _sweep(model, tiny_tokens), "lens": _lens(model, tiny_tokens)}
    for _ in range(3):
        results: dict[str, pd.DataFrame] = {}
        threads = [threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, f(model, tiny_tokens)))
                   for k, f in (("sweep", _sweep), ("lens", _lens))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for key, table in alone.items():
            _same(results[key], table, key)


def test_a_reordered_block_in_one_thread_does_not_reach_another_threads_lens(tiny_tokens: torch.Tensor) -> None:
    model = make_tiny_model("gpt2")
    alone = _lens(model, tiny_tokens)
    plan = soi.LayerPlan.drop(4, 0)
    expected = soi.run_plan(model, tiny_tokens, plan)
    inside: dict[str, object] = {}
    entered = threading.Event()

    def reorder() -> None:
        with soi.reordered(model, plan):
            entered.set()
            time.sleep(0.5)  # the other thread starts its lens now
            inside["logits"] = model(tiny_tokens)

    a = threading.Thread(target=reorder)
    a.start()
    assert entered.wait(timeout=30)
    lens = _lens(model, tiny_tokens)  # waits for the reordered block to end
    a.join(timeout=60)
    _same(lens, alone, "lens")
    assert torch.equal(inside["logits"], expected)
    assert torch.equal(model(tiny_tokens), soi.run_plan(model, tiny_tokens, soi.LayerPlan.identity(4)))


def test_a_thread_pool_of_four_analyses_gives_the_single_thread_numbers(tiny_tokens: torch.Tensor) -> None:
    model = make_tiny_model("parallel")
    analyses = {"sweep": _sweep, "lens": _lens, "attention": _attention, "sinks": _sinks}
    alone = {name: f(model, tiny_tokens) for name, f in analyses.items()}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {(name, i): pool.submit(f, model, tiny_tokens) for i in range(2) for name, f in analyses.items()}
        for (name, _), future in futures.items():
            _same(future.result(timeout=300), alone[name], name)
