"""The bootstrap of the stage boundaries: against a resampling written out in numpy, deterministic
for a seed, honest where the data is sure and where it is not, and in the study's stage table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from stages_of_inference.stages.bootstrap import PerSequence, boundary_intervals
from stages_of_inference.stages.placement import place_stages, stage_signals

N = 12


def _kl(rng: np.random.Generator, noise: float, n_seq: int = 8) -> np.ndarray:
    shape = np.array([9, 4, .3, .2, .2, .1, .1, .2, .3, .3, 2.5, 6])
    return shape * np.exp(noise * rng.standard_normal((n_seq, N)))


def test_the_bootstrap_equals_a_resampling_written_out() -> None:
    rng = np.random.default_rng(1)
    kl = _kl(rng, 0.6)
    out = boundary_intervals(PerSequence(drop_kl=kl), N, resamples=200, seed=7).set_index("boundary")
    # the same resampling, literally: numpy's generator with the same seed, one draw of 8 indices
    # per resample, the rule on the resampled mean
    gen = np.random.default_rng(7)
    starts = []
    for _ in range(200):
        idx = gen.integers(0, 8, 8)
        sweep = pd.DataFrame({"kind": "drop", "layer": range(N), "kl_nats": kl[idx].mean(axis=0)})
        starts.append(place_stages(sweep, n_layers=N).set_index("stage").loc["residual sharpening", "first_layer"])
    low, high = np.quantile(starts, [0.05, 0.95], method="inverted_cdf")
    assert (out.loc["rule: residual sharpening", "low"], out.loc["rule: residual sharpening", "high"]) == (low, high)
    point = place_stages(pd.DataFrame({"kind": "drop", "layer": range(N), "kl_nats": kl.mean(axis=0)}), n_layers=N)
    assert out.loc["rule: residual sharpening", "layer"] == point.set_index("stage").loc["residual sharpening", "first_layer"]


def test_every_resampled_boundary_equals_the_table_functions_on_each_resample() -> None:
    """All inputs at once (deletion KL, lens entropy, attention, neuron counts, depth counts, the
    phase readings), on noisy data where stages get squeezed: each resample's boundaries are those
    of place_stages and phase_boundaries on tables of that resample's means, drawn as
    PerSequence documents (one draw per batch size, the heavy batch with fewer sequences)."""
    from stages_of_inference.stages.competing import phase_boundaries

    rng = np.random.default_rng(3)
    main, heavy = 9, 5
    # the lens entropy falls around readout 8, the last five blocks hold more suppression neurons:
    # prediction ensembling is squeezed out in the resamples where the fall comes late
    midpoint = rng.normal(8.5, 1.5, (main, 1))
    lens = 3 + 12 / (1 + np.exp(np.arange(N + 1) - midpoint))
    values = {"drop_kl": _kl(rng, 1.5, heavy), "lens_entropy": lens,
              "attention": rng.uniform(0, 1, (main, N)), "depth_counts": rng.integers(0, 6, (main, N + 1)).astype(float),
              "bos_norm": rng.lognormal(2, 2, (main, N + 1)),
              "matrix_entropy": np.abs(np.arange(N + 1) - 5.0) / 6 + rng.uniform(0, 0.6, (main, N + 1))}
    neurons = pd.DataFrame({"layer": range(N), "n_prediction": [2] * 7 + [1] * 5, "n_suppression": [0] * 7 + [3] * 5})
    # at level 0.99 the 40 resamples' interval is their smallest and largest boundary
    out = {level: boundary_intervals(PerSequence(**values), N, neurons=neurons, resamples=40, seed=5,
                                     level=level).set_index("boundary") for level in (0.9, 0.99)}
    gen = np.random.default_rng(5)
    drawn: dict[str, list[int]] = {}
    for _ in range(40):
        draws = {}
        means = {}
        for name in ("drop_kl", "lens_entropy", "attention", "depth_counts", "bos_norm", "matrix_entropy"):
            n = len(values[name])
            if n not in draws:
                draws[n] = gen.integers(0, n, n)
            picked = values[name][draws[n]]
            means[name] = picked.sum(axis=0) if name == "depth_counts" else picked.mean(axis=0)
        stages = place_stages(pd.DataFrame({"kind": "drop", "layer": range(N), "kl_nats": means["drop_kl"]}),
                              pd.DataFrame({"layer": range(N + 1), "entropy_bits": means["lens_entropy"]}), neurons,
                              pd.DataFrame({"layer": range(N), "mean_attention": means["attention"]}), n_layers=N)
        for stage, first in zip(stages["stage"][1:], stages["first_layer"][1:]):
            drawn.setdefault(f"rule: {stage}", []).append(int(first))
        cdf = np.cumsum(means["depth_counts"]) / means["depth_counts"].sum()
        drawn.setdefault("half the predictions have settled", []).append(max(int(np.argmax(cdf >= 0.5)) - 1, 0))
        phases = phase_boundaries(pd.DataFrame({"readout": range(N + 1), "bos_norm": means["bos_norm"],
                                                "matrix_entropy": means["matrix_entropy"]})).set_index("phase")
        drawn.setdefault("compression begins (the first token's norm jumps)", []).append(int(phases.loc["compression", "readout"]))
        drawn.setdefault("the compression valley ends (the entropy recovers)", []).append(int(phases.loc["refinement", "readout"]))
    assert sorted(drawn) == sorted(out[0.9].index)
    for name, layers in drawn.items():
        low, high = np.quantile(layers, [0.05, 0.95], method="inverted_cdf")
        assert (out[0.9].loc[name, "low"], out[0.9].loc[name, "high"]) == (low, high), name
        assert (out[0.99].loc[name, "low"], out[0.99].loc[name, "high"]) == (min(layers), max(layers)), name
    squeezed = drawn["rule: prediction ensembling"]
    assert min(squeezed) == -1 < max(squeezed), "prediction ensembling is squeezed out in some resamples, not all"


def test_intervals_are_deterministic_and_widen_with_noise() -> None:
    quiet = PerSequence(drop_kl=_kl(np.random.default_rng(0), 0.01))
    noisy = PerSequence(drop_kl=_kl(np.random.default_rng(0), 1.5))
    a = boundary_intervals(noisy, N, resamples=100, seed=3)
    pd.testing.assert_frame_equal(a, boundary_intervals(noisy, N, resamples=100, seed=3))
    width = {name: (t["high"] - t["low"]).sum() for name, t in
             (("quiet", boundary_intervals(quiet, N, resamples=100)), ("noisy", a))}
    assert width["quiet"] == 0 < width["noisy"]


def test_every_resampled_signal_gets_an_interval_and_signals_agree_by_overlap() -> None:
    rng = np.random.default_rng(2)
    readouts = N + 1
    entropy = np.linspace(15, 4, readouts) * np.exp(0.05 * rng.standard_normal((4, readouts)))
    bos = np.r_[[2, 3, 80], np.full(readouts - 3, 90.0)] * np.exp(0.1 * rng.standard_normal((8, readouts)))
    mat = np.r_[[.8, .7, .1, .1, .12], np.linspace(.15, .6, readouts - 5)] + 0.01 * rng.random((8, readouts))
    depth = rng.integers(0, 5, (4, readouts)).astype(float)
    depth[:, -2] += 40
    samples = PerSequence(drop_kl=_kl(rng, 0.3), lens_entropy=entropy, attention=rng.uniform(0, 1, (8, N)),
                          depth_counts=depth, bos_norm=bos, matrix_entropy=mat)
    out = boundary_intervals(samples, N, resamples=50)
    assert set(out["boundary"]) == {"rule: feature engineering", "rule: prediction ensembling", "rule: residual sharpening",
                                    "half the predictions have settled", "compression begins (the first token's norm jumps)",
                                    "the compression valley ends (the entropy recovers)"}
    assert (out["low"] <= out["high"]).all()
    stages = pd.DataFrame({"stage": ["detokenization", "feature engineering", "prediction ensembling", "residual sharpening"],
                           "first_layer": [0, 2, 6, 10], "n_blocks": [2, 4, 4, 2]})
    intervals = pd.DataFrame({"boundary": ["rule: feature engineering", "compression begins (the first token's norm jumps)"],
                              "low": [1, 4], "high": [3, 5]})
    phases = pd.DataFrame({"phase": ["compression", "refinement"], "readout": [4, 11]})
    signals = stage_signals(stages, phases=phases, intervals=intervals).set_index("signal")
    row = signals.loc["compression begins (the first token's norm jumps)"]
    assert not row["agrees"] and row["judged_by"] == "intervals"  # 4..5 against 1..3
    wider = intervals.assign(high=[4, 5])
    assert stage_signals(stages, phases=phases, intervals=wider).set_index("signal").loc[row.name, "agrees"]
    unresampled = signals.loc["the compression valley ends (the entropy recovers)"]
    assert unresampled["judged_by"] == "distance"


@pytest.mark.parametrize("bad", [0, 5, -1])
def test_bad_resamples_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="resamples"):
        boundary_intervals(PerSequence(drop_kl=np.ones((3, N))), N, resamples=bad)


def test_bad_per_sequence_values_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 sequences"):
        PerSequence(drop_kl=np.ones((1, N)))
    with pytest.raises(ValueError, match="together"):
        PerSequence(bos_norm=np.ones((3, N)))


def test_a_stage_without_a_block_in_some_resamples_is_said_so_and_draws_no_whisker() -> None:
    """An interval end of -1 (the stage got no block in those resamples) is no depth: the stage
    table's start is NaN there, the figure draws no whisker for it, the reading says so in words."""
    from pathlib import Path

    import plotly.graph_objects as go

    from stages_of_inference.plots import add_stage_bands
    from stages_of_inference.study.config import StudyConfig
    from stages_of_inference.study.folder import with_intervals
    from stages_of_inference.study.readings import read_stages
    from stages_of_inference.study.registry import Study

    sweep = pd.DataFrame({"kind": "drop", "layer": range(N), "kl_nats": _kl(np.random.default_rng(0), 0.0)[0]})
    stages = place_stages(sweep, n_layers=N)
    first = stages.set_index("stage")["first_layer"]
    intervals = pd.DataFrame({"boundary": ["rule: feature engineering", "rule: prediction ensembling", "rule: residual sharpening"],
                              "low": [first["feature engineering"], -1, -1], "high": [first["feature engineering"], 7, -1]})
    table = with_intervals(stages, intervals, N).set_index("stage")
    assert np.isnan(table.loc["prediction ensembling", "start_low"]) and table.loc["prediction ensembling", "start_high"] > 0
    assert np.isnan(table.loc["residual sharpening", "start_low"]) and np.isnan(table.loc["residual sharpening", "start_high"])
    fig = add_stage_bands(go.Figure(), table.reset_index())
    assert len(fig.layout.shapes) == len(stages), "one band per stage and no whisker from a missing end"
    text = read_stages(Study(StudyConfig(models=("m",)), Path("unused"), stages={"m": table.reset_index()}))
    assert "-1" not in text
    assert "gets no block or starts at a block up to 7" in text and "gets no block in most resamples" in text
