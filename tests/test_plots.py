"""Figures: one per analysis, against relative depth, one colour per model, never shown."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import stages_of_inference as soi
from stages_of_inference import plots
from stages_of_inference.stages import detokenization as detok
from stages_of_inference.stages import feature_engineering as fe
from stages_of_inference.stages import prediction_ensembling as pe
from stages_of_inference.stages import residual_sharpening as rs


def _named(df: pd.DataFrame, name: str, n_layers: int) -> pd.DataFrame:
    df = df.copy()
    df.attrs["provenance"] = {"model": {"name": name, "n_layers": n_layers}}
    return df


def _sweep_table(name: str, n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [{"kind": "none", "layer": None, "relative_depth": np.nan, "kl_nats": 0.0, "loss_delta": 0.0,
             "relative_accuracy": 1.0, "top1_agreement": 1.0, "accuracy": 0.4}]
    for kind, layers in (("drop", range(n)), ("swap", range(n - 1))):
        for i in layers:
            kl = 8.0 if (kind == "drop" and i == 0) else (2.0 if i == n - 1 else 0.1 + 0.05 * rng.random())
            rows.append({"kind": kind, "layer": i, "relative_depth": i / (n - 1), "kl_nats": kl, "loss_delta": kl / 2,
                         "relative_accuracy": 1 - kl / 10, "top1_agreement": 1 - kl / 9, "accuracy": 0.4 * (1 - kl / 10)})
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    return _named(df, name, n)


def _lens_table(name: str, n: int, convention: str) -> pd.DataFrame:
    k = np.arange(n + 1)
    h = np.where(k < n / 2, 15.0, 15.0 - 10 * (k - n / 2) / (n / 2)) if convention == "paper" else 1 + k / n
    return _named(pd.DataFrame({"layer": k, "relative_depth": k / n, "entropy_bits": h, "entropy_bits_sem": 0.1,
                                "kl_to_final_nats": (n - k) / n * 5, "convention": convention}), name, n)


def _axes_titles(fig: go.Figure) -> list[str]:
    keys = [k for k in fig.layout.to_plotly_json() if k.startswith(("xaxis", "yaxis"))]
    return [fig.layout[k].title.text for k in keys if fig.layout[k].title.text]


def _check(fig: go.Figure, models: list[str]) -> None:
    assert isinstance(fig, go.Figure)
    assert len(fig.data) > 0
    assert fig.layout.title.text
    names = " ".join(str(t.name) for t in fig.data)
    for model in models:
        assert model in names or model in " ".join(a.text for a in fig.layout.annotations)
    titles = _axes_titles(fig)
    assert any("relative depth" in t for t in titles), titles
    assert all(t for t in titles)


def test_every_figure_overlays_two_models_on_relative_depth() -> None:
    a, b = ("deep", 12), ("shallow", 6)
    sweeps = [_sweep_table(name, n) for name, n in (a, b)]
    fig = plots.robustness(sweeps)
    _check(fig, ["deep", "shallow"])
    deep = [t for t in fig.data if t.name == "deep: delete block"][0]
    shallow = [t for t in fig.data if t.name == "shallow: delete block"][0]
    assert deep.x[0] == shallow.x[0] == 0.0 and deep.x[-1] == shallow.x[-1] == 1.0  # same axis for 12 and 6 blocks
    assert deep.line.color != shallow.line.color
    assert fig.layout.yaxis.type == "log"

    att = [_named(pd.DataFrame({"layer": range(n), "relative_depth": np.arange(n) / (n - 1),
                                "mean_attention": np.linspace(.1, .02, n), "sem": .005, "k": 5}), name, n)
           for name, n in (a, b)]
    _check(plots.previous_token_attention(att), ["deep", "shallow"])
    lens = [_lens_table(name, n, c) for name, n in (a, b) for c in ("paper", "per_layer_norm")]
    fig = plots.logit_lens(lens)
    _check(fig, ["deep", "shallow"])
    assert {t.xaxis for t in fig.data} == {"x", "x2", "x3", "x4"}  # both conventions, both metrics
    probes = [_named(pd.DataFrame({"relative_depth": np.arange(n + 1) / n, "accuracy": .8, "baseline": .6,
                                   "label": "next_starts_word"}), name, n) for name, n in (a, b)]
    _check(plots.probe_accuracy(probes), ["deep", "shallow"])
    counts = [_named(pd.DataFrame({"layer": range(n), "relative_depth": np.arange(n) / (n - 1),
                                   "n_prediction": np.arange(n), "n_suppression": np.arange(n)[::-1],
                                   "share_prediction": .01, "share_suppression": .02}), name, n) for name, n in (a, b)]
    fig = plots.neuron_counts(counts, share=True)
    _check(fig, ["deep", "shallow"])
    assert "%" in fig.layout.yaxis.title.text
    prof = [_named(pd.DataFrame({"relative_depth": np.arange(n) / (n - 1), "entropy_change_bits": -.1,
                                 "confidence_change": .01, "share_suppression": .01}), name, n) for name, n in (a, b)]
    _check(plots.sharpening_profile(prof), ["deep", "shallow"])
    rep = [_named(pd.DataFrame({"layer": range(n), "relative_depth": np.arange(n) / (n - 1),
                                "entropy_change_bits": .2, "kl_nats": .3}), name, n) for name, n in (a, b)]
    _check(plots.layer_repetition(rep), ["deep", "shallow"])
    heads = [_named(pd.DataFrame({"layer": np.repeat(range(n), 2), "head": np.tile([0, 1], n),
                                  "relative_depth": np.repeat(np.arange(n) / (n - 1), 2),
                                  "difference": np.linspace(.5, 0, 2 * n)}), name, n) for name, n in (a, b)]
    fig = plots.subjoiner_scores(heads, top=2)
    _check(fig, ["deep", "shallow"])
    assert "L0H0" in fig.data[0].text
    sim = [_named(pd.DataFrame([{"layer_a": i, "layer_b": j, "relative_depth_a": i / (n - 1),
                                 "relative_depth_b": j / (n - 1), "similarity": 1 - abs(i - j) / n, "method": "cka"}
                                for i in range(n) for j in range(n)]), name, n) for name, n in (a, b)]
    fig = plots.layer_similarity(sim)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"]
    assert "relative depth" in fig.layout.xaxis.title.text and fig.layout.coloraxis.colorbar.title.text


def test_figures_from_real_results_of_a_tiny_model(tiny_model, tiny_tokens) -> None:
    sweep = soi.robustness_sweep(tiny_model, tiny_tokens, per_token=True, progress=False)
    table = plots.robustness_table(sweep)
    assert {"kl_nats_sem", "relative_accuracy_sem", "loss_delta_sem", "top1_agreement_sem"} <= set(table.columns)
    # the band is the standard error of the per-sequence means
    tok = sweep.per_token
    part = tok[(tok["kind"] == "drop") & (tok["layer"] == 1)]
    per_seq = part.groupby("sequence")["kl_nats"].mean()
    expected = per_seq.std(ddof=1) / np.sqrt(len(per_seq))
    got = table[(table["kind"] == "drop") & (table["layer"] == 1)]["kl_nats_sem"].iloc[0]
    assert got == pytest.approx(expected)
    fig = plots.robustness(sweep, metrics=("kl_nats", "relative_accuracy"))
    assert any(t.fill == "toself" for t in fig.data)  # error bands drawn
    att = detok.previous_token_attention(tiny_model, tiny_tokens, k=3, progress=False)
    lens = pd.concat([fe.logit_lens(tiny_model, tiny_tokens, convention=c, progress=False)
                      for c in ("paper", "per_layer_norm")])
    lens.attrs = fe.logit_lens(tiny_model, tiny_tokens, progress=False).attrs
    moments = pe.neuron_moments(tiny_model, progress=False)
    with pytest.raises(ValueError, match="needs the columns"):  # plots draw counts; they do not count
        plots.neuron_counts(moments)
    stages = plots.place_stages(sweep, lens[lens["convention"] == "paper"], moments, att)
    assert stages["stage"].tolist() == list(plots.STAGES)
    for fig in (
        plots.previous_token_attention(att, stages=stages),
        plots.logit_lens(lens, stages=stages),
        plots.layer_similarity(fe.layer_similarity(tiny_model, tiny_tokens, progress=False)),
        plots.probe_accuracy(fe.probe_layers(tiny_model, tiny_tokens, (tiny_tokens % 2).long(), progress=False)),
        plots.neuron_counts(pe.neuron_counts(moments), stages=stages),
        plots.sharpening_profile(rs.sharpening_profile(tiny_model, tiny_tokens, moments=moments, progress=False)),
        plots.layer_repetition(rs.layer_repetition(tiny_model, tiny_tokens, 1, 3, progress=False)),
    ):
        assert isinstance(fig, go.Figure) and len(fig.data) > 0
    banded = plots.previous_token_attention(att, stages=stages)
    assert len(banded.layout.shapes) == int((stages["n_blocks"] > 0).sum())


def test_subjoiner_patterns_from_a_result_and_from_its_saved_table() -> None:
    from types import SimpleNamespace

    heads = pd.DataFrame({"layer": [1, 0], "head": [0, 1], "relative_depth": [1.0, 0.0], "difference": [.5, .1]})
    result = SimpleNamespace(heads=heads, patterns=torch.rand(2, 2, 5, 5), control_patterns=torch.rand(2, 2, 5, 5),
                             n_pieces=4)
    fig = plots.subjoiner_patterns(result, top=2)
    assert [t.type for t in fig.data] == ["heatmap"] * 4
    assert "L1H0" in fig.layout.annotations[0].text
    assert "query" in fig.layout.yaxis.title.text and "key" in fig.layout.xaxis.title.text
    long = plots._pattern_table(result)
    long.attrs["heads"] = heads
    assert len(plots.subjoiner_patterns(long, heads=[(0, 1)]).data) == 2
    with pytest.raises(ValueError, match="no pattern"):
        plots.subjoiner_patterns(long, heads=[(5, 5)])


def test_place_stages_rule() -> None:
    n = 10
    sweep = _sweep_table("m", n)
    lens = _lens_table("m", n, "paper")
    counts = pd.DataFrame({"layer": range(n), "n_prediction": [0] * 7 + [3, 4, 5],
                           "n_suppression": [0] * 8 + [6, 9]})
    att = pd.DataFrame({"layer": range(n), "mean_attention": [.04, .08, .06] + [.03] * 7})
    st = plots.place_stages(sweep, lens, counts, att)
    assert st["first_layer"].tolist() == [0, 2, 6, 8]  # b: attention peaks at block 1; c: lens; d: suppression
    assert st["last_layer"].tolist() == [1, 5, 7, 9]
    assert st["start"].iloc[0] == 0.0 and st["end"].iloc[-1] == 1.0
    assert np.allclose(st["end"].iloc[:-1].to_numpy(), st["start"].iloc[1:].to_numpy())  # bands meet
    assert (st["model"] == "m").all() and st["evidence"].str.len().min() > 0
    # from the sweep alone: block 0 and the last block are fragile
    alone = plots.place_stages(sweep)
    assert alone["first_layer"].iloc[1] == 1 and alone["first_layer"].iloc[3] == n - 1
    with pytest.raises(ValueError, match="at least one measurement"):
        plots.place_stages()
    with pytest.raises(ValueError, match="fragile"):
        plots.place_stages(sweep, fragile=0.5)
    with pytest.raises(ValueError, match="columns"):
        plots.place_stages(pd.DataFrame({"kind": ["drop"], "layer": [0]}))


def test_stage_bands_shaded_for_one_model_and_lines_for_several() -> None:
    one = plots.place_stages(_sweep_table("a", 10), _lens_table("a", 10, "paper"))
    two = plots.place_stages(_sweep_table("b", 6), _lens_table("b", 6, "paper"))
    fig = plots.previous_token_attention(pd.DataFrame({"relative_depth": [0, 1], "mean_attention": [.1, .02]}),
                                         stages=one)
    assert all(s.type == "rect" for s in fig.layout.shapes) and len(fig.layout.shapes) == 4
    assert {t.name for t in fig.data if t.legendgroup == "stages"} == {f"stage: {s}" for s in plots.STAGES}
    fig = plots.previous_token_attention(pd.DataFrame({"relative_depth": [0, 1], "mean_attention": [.1, .02]}),
                                         stages=[one, two])
    assert all(s.type == "line" for s in fig.layout.shapes) and len(fig.layout.shapes) == 6
    assert {t.name for t in fig.data if t.legendgroup == "stages"} == {"a: stage boundaries", "b: stage boundaries"}


def test_bad_inputs_fail_clearly() -> None:
    with pytest.raises(ValueError, match="empty"):
        plots.previous_token_attention([])
    with pytest.raises(ValueError, match="needs the columns"):
        plots.previous_token_attention(pd.DataFrame({"relative_depth": [0.0]}))
    with pytest.raises(ValueError, match="unknown metric"):
        plots.robustness(_sweep_table("m", 4), metrics=("bogus",))
    with pytest.raises(ValueError, match="unknown kind"):
        plots.robustness(_sweep_table("m", 4), kinds=("shuffle",))
    with pytest.raises(TypeError, match="DataFrame"):
        plots.logit_lens(42)


def test_plots_never_show(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("a plot function called show()")

    monkeypatch.setattr(go.Figure, "show", boom)
    plots.robustness(_sweep_table("m", 5))
    plots.logit_lens(_lens_table("m", 5, "paper"))
