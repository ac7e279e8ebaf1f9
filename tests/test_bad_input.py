"""The catalogue of bad input, kept as tests: every case must end in a clear error (for the command
line: one line on stderr and exit code 2) that says what was wrong, before any model loads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_model

import stages_of_inference as soi
from stages_of_inference import cli
from stages_of_inference.batch import TokenBatch
from stages_of_inference.interventions.executor import evaluate_plans
from stages_of_inference.interventions.options import EngineOptions
from stages_of_inference.study import Analysis, StudyConfig, register, run_study


def _model() -> Any:
    return make_tiny_model("gpt2")


def _tokens() -> torch.Tensor:
    return torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(0))


def _plans() -> list[soi.LayerPlan]:
    return [soi.LayerPlan.drop(4, 1)]


API_CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("options: batch_size 0", lambda: EngineOptions(batch_size=0), ValueError, "batch_size must be a positive number"),
    ("options: batch_size True", lambda: EngineOptions(batch_size=True), ValueError, "batch_size"),
    ("options: chunk_tokens -1", lambda: EngineOptions(chunk_tokens=-1), ValueError, "chunk_tokens"),
    ("options: stack_tokens 0", lambda: EngineOptions(stack_tokens=0), ValueError, "stack_tokens"),
    ("options: unembed_block 0", lambda: EngineOptions(unembed_block=0), ValueError, "unembed_block"),
    ("options: fast_path 'yes'", lambda: EngineOptions(fast_path="yes"), ValueError, "fast_path must be True or False"),
    ("sweep: unknown setting", lambda: evaluate_plans(_model(), _tokens(), _plans(), batchsize=2), ValueError,
     r"unknown engine setting\(s\) \['batchsize'\]"),
    ("sweep: options and settings", lambda: evaluate_plans(_model(), _tokens(), _plans(), EngineOptions(), batch_size=2),
     ValueError, "not both"),
    ("sweep: no plans", lambda: evaluate_plans(_model(), _tokens(), []), ValueError, "plans is empty"),
    ("sweep: a plan for another depth", lambda: evaluate_plans(_model(), _tokens(), [soi.LayerPlan.drop(6, 1)]),
     ValueError, "n_layers"),
    ("sweep: kinds unknown", lambda: soi.robustness_sweep(_model(), _tokens(), kinds=("drop", "delete")), ValueError,
     "unknown sweep kind"),
    ("sweep: settings positional", lambda: soi.robustness_sweep(_model(), _tokens(), ("drop",), True), TypeError,
     "options must be an EngineOptions, got bool"),
    ("tokens: 3-d", lambda: soi.run_plan(_model(), torch.zeros(1, 2, 3, dtype=torch.long), soi.LayerPlan.identity(4)),
     ValueError, r"shape \[batch, pos\]"),
    ("tokens: out of vocabulary", lambda: soi.run_plan(_model(), torch.full((1, 4), 10_000), soi.LayerPlan.identity(4)),
     ValueError, "token ids must lie in"),
    ("TokenBatch: not a tensor", lambda: TokenBatch([[0, 1]]), TypeError, "must be a torch.Tensor"),
    ("TokenBatch: indexed by an int", lambda: TokenBatch(_tokens())[0], TypeError, "slice of rows"),
    ("model: a string", lambda: soi.run_plan("gpt2", _tokens(), soi.LayerPlan.identity(4)), TypeError,
     "HookedTransformer"),
    ("load_tokens: n_sequences True", lambda: soi.load_tokens(_model(), ["a b c"], n_sequences=True), ValueError,
     "n_sequences must be a positive integer"),
    ("load_model: device banana", lambda: soi.load_model("smollm2-135m", device="banana"), ValueError,
     "unknown device 'banana'"),
    ("load_model: unknown name", lambda: soi.load_model("no-such-model-xyz"), soi.models.ModelNotAvailableError,
     "unknown model"),
    ("study: unknown analysis", lambda: StudyConfig(analyses=("robustness", "nope")), ValueError, "unknown analyses"),
    ("study: device banana", lambda: StudyConfig(device="banana"), ValueError, "unknown device"),
    ("study: batch_size 0", lambda: StudyConfig(batch_size=0), ValueError, "batch_size"),
    ("study: heavy_fraction 2", lambda: StudyConfig(heavy_fraction=2.0), ValueError, "heavy_fraction"),
    ("study: on_mismatch", lambda: soi.run_study("smollm2-135m", on_mismatch="ignore"), ValueError, "on_mismatch"),
    ("register: not an Analysis", lambda: register(lambda ctx: {}), TypeError, "takes an Analysis"),
    ("register: a taken name", lambda: register(Analysis("robustness", lambda ctx: {})), ValueError,
     "registered already"),
    ("register: tokens 'all'", lambda: register(Analysis("x_bad_tokens", lambda ctx: {}, tokens="all")), ValueError,
     "tokens must be"),
    ("plots: moments for counts", lambda: soi.plots.neuron_counts(pd.DataFrame({"layer": [0], "kind": ["other"]})),
     ValueError, "needs the columns"),
    ("plots: no results", lambda: soi.plots.logit_lens([]), ValueError, "no result to plot"),
    ("count: numpy float", lambda: EngineOptions(batch_size=np.float64(2)), ValueError, "batch_size"),
    # third round (docs/reliability.md): the study's settings and tokens of a wrong type or place
    ("study: analyses 5", lambda: run_study("m", analyses=5), TypeError, "analyses must be a name or a sequence"),
    ("study: config a dict", lambda: run_study(config={"models": ["m"]}), TypeError, "config must be a StudyConfig"),
    ("StudyConfig: k '5'", lambda: StudyConfig(k="5"), TypeError, "k must be a whole number"),
    ("StudyConfig: seed '1'", lambda: StudyConfig(seed="1"), TypeError, "seed must be a whole number"),
    ("StudyConfig: models [1, 2]", lambda: StudyConfig(models=[1, 2]), TypeError, "models must be a name or a sequence"),
    ("StudyConfig: seed 10**23", lambda: StudyConfig(seed=10**23), ValueError, r"seed must be a whole number in 0 \.\. 2\*\*63"),
    ("tokens: int8", lambda: soi.run_plan(_model(), torch.zeros(1, 5, dtype=torch.int8), soi.LayerPlan.identity(4)),
     TypeError, "dtype torch.int64"),
    ("tokens: uint8", lambda: soi.robustness_sweep(_model(), torch.zeros(1, 5, dtype=torch.uint8), progress=False),
     TypeError, "dtype torch.int64"),
    ("tokens: meta device", lambda: soi.run_plan(_model(), torch.zeros(1, 5, dtype=torch.long, device="meta"),
                                                  soi.LayerPlan.identity(4)), ValueError, "meta device"),
    ("plan: JSON nested too deeply", lambda: soi.LayerPlan.from_json("[" * 100000), ValueError, "nested too deeply"),
]


# Cases whose argument has the wrong type: under the test run's runtime type checks (pyproject's
# --jaxtyping-packages) the annotation refuses them first, so their own messages are checked in a
# plain process below, as a user meets them.
WRONG_TYPE = {"options: batch_size True", "options: fast_path 'yes'", "sweep: settings positional",
              "TokenBatch: not a tensor", "model: a string", "load_tokens: n_sequences True",
              "register: not an Analysis", "count: numpy float", "tokens: 3-d", "TokenBatch: indexed by an int",
              "register: tokens 'all'", "study: analyses 5", "study: config a dict", "StudyConfig: k '5'",
              "StudyConfig: seed '1'", "StudyConfig: models [1, 2]", "tokens: int8", "tokens: uint8"}


@pytest.mark.parametrize(("case", "call", "error", "match"), API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(case: str, call: Callable[[], Any], error: type[Exception], match: str,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if case in WRONG_TYPE:
        with pytest.raises((error, TypeError)):
            call()
        return
    with pytest.raises(error, match=match):
        call()


def test_wrong_types_get_the_library_s_own_message_without_a_type_checker() -> None:
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import re, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "import test_bad_input as t\n"
        "for case, call, error, match in t.API_CASES:\n"
        "    if case not in t.WRONG_TYPE: continue\n"
        "    try: call()\n"
        "    except error as e:\n"
        "        assert re.search(match, str(e)), (case, str(e))\n"
        "        print('ok', case)\n"
        "    else: raise AssertionError(case + ': no error')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1], env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok ") == len(WRONG_TYPE), done.stdout


CLI_CASES: list[tuple[str, list[str], str]] = [
    ("run: --batch-size 0", ["run", "--batch-size", "0"], "expected a positive number"),
    ("run: --n-tokens abc", ["run", "--n-tokens", "abc"], "expected a whole number"),
    ("run: --n-tokens below two sequences", ["run", "--n-tokens", "100"], "n_tokens must be at least two sequences"),
    ("run: --seq-len 4", ["run", "--seq-len", "4"], "seq_len must be an integer of at least 8"),
    ("run: --heavy-fraction 0", ["run", "--heavy-fraction", "0"], "heavy_fraction must lie in"),
    ("run: --heavy-fraction abc", ["run", "--heavy-fraction", "abc"], "invalid float value"),
    ("run: --k 0", ["run", "--k", "0"], "expected a positive number"),
    ("run: --probe-label", ["run", "--probe-label", "pos"], "invalid choice"),
    ("run: --subjoiner-prompts 3", ["run", "--subjoiner-prompts", "3"], "subjoiner_prompts must be at least 16"),
    ("run: --kurtosis-threshold x", ["run", "--kurtosis-threshold", "x"], "invalid float value"),
    ("run: --format xlsx", ["run", "--format", "xlsx"], "invalid choice"),
    ("run: --analyses nope", ["run", "--analyses", "robustness,nope"], "unknown analyses"),
    ("run: --analyses empty", ["run", "--analyses", ","], "no analyses given"),
    ("run: --seed abc", ["run", "--seed", "abc"], "invalid int value"),
    ("run: --on-mismatch", ["run", "--on-mismatch", "ignore"], "invalid choice"),
    ("run: --device banana", ["run", "--device", "banana"], "unknown device 'banana'"),
    ("run: the same model twice", ["run", "--model", "smollm2-135m", "--model", "smollm2-135m"], "listed twice"),
    ("run: --corpus missing file", ["run", "--corpus", "./no-such-corpus.txt"], "no such corpus"),
    ("run: --out-dir under /proc", ["run", "--out-dir", "/proc/x/y"], "cannot be written"),
    ("run: unknown option", ["run", "--frobnicate"], "unrecognized arguments"),
    ("sweep: --kinds", ["sweep", "--kinds", "drop,delete"], "unknown sweep kind"),
    ("sweep: --n-tokens 0", ["sweep", "--n-tokens", "0"], "expected a positive number"),
    ("sweep: --n-tokens below two sequences", ["sweep", "--n-tokens", "128"], "at least two sequences"),
    ("sweep: --out under /proc", ["sweep", "--out", "/proc/x.csv"], "cannot be written"),
    ("lens: --convention", ["lens", "--convention", "tuned"], "invalid choice"),
    ("lens: --device cuda:x", ["lens", "--device", "cuda:x"], "unknown device"),
    ("neurons: --threshold x", ["neurons", "--threshold", "x"], "invalid float value"),
    ("no command", [], "required: COMMAND"),
    ("unknown command", ["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize(("case", "argv", "match"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_and_exit_2(case: str, argv: list[str], match: str, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(soi.models, "load_model", _no_model)  # a case that gets as far as loading a model fails
    monkeypatch.setattr(soi, "load_model", _no_model, raising=False)
    try:
        code = cli.main([*argv, "--quiet"] if argv and argv[0] in ("run", "sweep", "lens", "neurons") else argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE, (case, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0], (case, err)


def _no_model(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a model was loaded before the bad input was refused")
