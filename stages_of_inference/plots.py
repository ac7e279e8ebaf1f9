"""Plotly figures from results: one function per analysis, every one drawn against relative depth.

Every function takes one result or several (a list), returns a ``plotly.graph_objects.Figure`` and
never shows it: call ``fig.show()`` in a notebook, ``fig.write_html(...)`` elsewhere. Results of
models of different depth share the x axis because it is the *relative* depth
(:func:`stages_of_inference.relative_depth`): ``i / (n_layers - 1)`` for blocks, ``k / n_layers``
for logit-lens readouts. Each model gets one colour, in the order its results first appear; the
model's name is read from the result's provenance (``attrs["provenance"]["model"]["name"]``).

The four stages of inference are drawn as shaded bands where the data places them
(:func:`place_stages`; the rule is in its docstring and in ``docs/stages.md``): pass the table it
returns as ``stages=``. With one model the bands are shaded; with several, each model's stage
boundaries are drawn as dotted lines in its colour.

Plots only read tables: no function here runs a model.

Example:
    >>> import pandas as pd
    >>> df = pd.DataFrame({"layer": [0, 1, 2], "relative_depth": [0, .5, 1], "mean_attention": [.1, .05, .02], "sem": [.01, .01, .01]})
    >>> df.attrs["provenance"] = {"model": {"name": "demo", "n_layers": 3}}
    >>> fig = previous_token_attention(df)
    >>> fig.data[-1].name, fig.layout.xaxis.title.text
    ('demo', 'relative depth (block i / (n_layers - 1))')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from stages_of_inference._tables import require_columns, result_model, table_of
from stages_of_inference.results import Result
from stages_of_inference.stages.competing import PROXIES
from stages_of_inference.stages.detokenization import SubjoinerResult, pattern_table
from stages_of_inference.stages.placement import STAGES, place_stages

Results = pd.DataFrame | Result | Sequence[pd.DataFrame | Result]
"""What a figure draws: a result's table, a :class:`~stages_of_inference.results.Result`, or one
of either per model (overlaid on relative depth)."""

Stages = pd.DataFrame | Sequence[pd.DataFrame] | None
"""Stage tables (:func:`~stages_of_inference.stages.placement.place_stages`) to shade, one per model."""

__all__ = [
    "BLOCK_DEPTH",
    "READOUT_DEPTH",
    "STAGES",
    "add_stage_bands",
    "competing_readings",
    "contiguous_deletions",
    "guess_then_refine",
    "layer_repetition",
    "layer_similarity",
    "lens_comparison",
    "logit_lens",
    "model_colors",
    "palette",
    "neuron_counts",
    "place_stages",
    "prediction_depth",
    "previous_token_attention",
    "probe_accuracy",
    "result_model",
    "robustness",
    "robustness_table",
    "sharpening_profile",
    "sink_profile",
    "subjoiner_patterns",
    "subjoiner_scores",
    "task_damage",
    "layer_effects",
    "sublayer_deletion",
]

BLOCK_DEPTH = "relative depth (block i / (n_layers - 1))"
"""x-axis title of per-block figures."""
READOUT_DEPTH = "relative depth (readout k / n_layers; 0 = embeddings)"
"""x-axis title of logit-lens figures."""

_STAGE_FILL = ("#4c78a8", "#72b7b2", "#f58518", "#e45756")
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_X_RANGE = (-0.03, 1.03)
_LOG_TICKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)

_METRICS = {  # sweep column -> (axis title, per-token column, how the per-token values scale)
    "kl_nats": ("KL(original || intervened) (nats)", "kl_nats"),
    "loss_delta": ("loss increase (nats / token)", "loss_delta"),
    "relative_accuracy": ("top-1 accuracy retained (fraction of original)", "correct"),
    "top1_agreement": ("top-1 agreement with original (fraction)", "agree"),
    "accuracy": ("top-1 accuracy (fraction)", "correct"),
    "entropy_bits": ("output entropy (bits)", "entropy_bits"),
}
_KIND_DASH = {"drop": "solid", "swap": "dash", "drop_attention": "dot", "drop_mlp": "dashdot"}
_KIND_NAME = {"drop": "delete block", "swap": "swap with next", "drop_attention": "delete attention only",
              "drop_mlp": "delete MLP only"}


# --------------------------------------------------------------------------------------------
# inputs



def _as_list(results: Any) -> list[Any]:
    if results is None:
        raise ValueError("no result to plot: pass a result or a list of results")
    if isinstance(results, (list, tuple)):
        items = list(results)
    else:
        items = [results]
    if not items:
        raise ValueError("no result to plot: the list of results is empty")
    return items


def palette(names: Sequence[str]) -> dict[str, str]:
    """One colour per name, in order (the colours :func:`model_colors` hands out).

    Example:
        >>> palette(["a", "b"])
        {'a': '#1f77b4', 'b': '#d62728'}
    """
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(names)}


def model_colors(results: Any, colors: Mapping[str, str] | None = None) -> dict[str, str]:
    """One colour per model, in the order the models first appear in ``results``.

    Example:
        >>> import pandas as pd
        >>> a, b = pd.DataFrame(), pd.DataFrame()
        >>> a.attrs["provenance"] = {"model": {"name": "a"}}; b.attrs["provenance"] = {"model": {"name": "b"}}
        >>> model_colors([a, b, a])
        {'a': '#1f77b4', 'b': '#d62728'}
    """
    out: dict[str, str] = dict(colors or {})
    for result in _as_list(results):
        name = result_model(result)
        if name not in out:
            out[name] = _PALETTE[len(out) % len(_PALETTE)]
    return out


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


# --------------------------------------------------------------------------------------------
# building blocks


def _line(
    fig: go.Figure,
    x: Any,
    y: Any,
    name: str,
    color: str,
    err: Any = None,
    *,
    row: int | None = None,
    col: int | None = None,
    dash: str = "solid",
    legendgroup: str | None = None,
    showlegend: bool = True,
    hover: str = "",
) -> None:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    where = {} if row is None else {"row": row, "col": col}
    group = legendgroup or name
    if err is not None:
        e = np.nan_to_num(np.asarray(err, dtype=float))
        fig.add_trace(go.Scatter(
            x=np.concatenate([x, x[::-1]]), y=np.concatenate([y + e, (y - e)[::-1]]), fill="toself",
            fillcolor=_rgba(color, 0.18), line={"width": 0}, mode="lines", hoverinfo="skip", showlegend=False,
            legendgroup=group, name=f"{name} ± 1 s.e.",
        ), **where)
    fig.add_trace(go.Scatter(
        x=x, y=y, mode="lines+markers", name=name, legendgroup=group, showlegend=showlegend,
        line={"color": color, "dash": dash, "width": 2}, marker={"size": 5, "color": color},
        hovertemplate=f"{name}<br>depth %{{x:.2f}}<br>%{{y:.4g}}{hover}<extra></extra>",
    ), **where)


def _layout(fig: go.Figure, title: str, height: int = 420) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"}, template="plotly_white", height=height,
        margin={"l": 70, "r": 30, "t": 80, "b": 60}, hovermode="closest",
        legend={"tracegroupgap": 2, "font": {"size": 11}},
    )
    return fig


def _depth_axes(fig: go.Figure, title: str = BLOCK_DEPTH) -> None:
    fig.update_xaxes(title_text=title, range=list(_X_RANGE), zeroline=False)


# --------------------------------------------------------------------------------------------
# stages


def add_stage_bands(
    fig: go.Figure,
    stages: pd.DataFrame | Sequence[pd.DataFrame] | None,
    colors: Mapping[str, str] | None = None,
) -> go.Figure:
    """Draw stages placed by :func:`place_stages` on every subplot of ``fig`` (in place; returns it).

    One model: shaded bands, labelled on top, and where the table has ``start_low`` and
    ``start_high`` (bootstrap intervals of each stage's start) a whisker along the top of every
    panel spanning the interval. Several models (a list of tables, or one table with
    several ``model`` values): each model's boundaries as dotted lines in its colour.

    Example:
        >>> import plotly.graph_objects as go, pandas as pd
        >>> st = pd.DataFrame({"stage": ["detokenization"], "start": [0.0], "end": [0.2], "n_blocks": [2], "model": ["m"]})
        >>> len(add_stage_bands(go.Figure(), st).layout.shapes)
        1
    """
    if stages is None:
        return fig
    table = pd.concat(list(stages), ignore_index=True) if isinstance(stages, (list, tuple)) else stages
    if table is None or table.empty:
        return fig
    require_columns(table, ["stage", "start", "end"], "add_stage_bands")
    table = table[table.get("n_blocks", pd.Series(1, index=table.index)) > 0]
    models = list(dict.fromkeys(table["model"])) if "model" in table else ["model"]
    where = {"row": "all", "col": "all"}  # every panel (plotly ignores them on a figure without subplots)
    if len(models) <= 1:
        for _, row in table.iterrows():
            fill = _STAGE_FILL[STAGES.index(row["stage"]) % 4] if row["stage"] in STAGES else "#bbbbbb"
            fig.add_vrect(x0=float(row["start"]), x1=float(row["end"]), fillcolor=fill, opacity=0.12,
                          line_width=0, layer="below", **where)
            if "start_low" in row and float(row["start"]) > 0 and row["start_high"] > row["start_low"]:
                _whisker(fig, float(row["start_low"]), float(row["start_high"]), fill)
            # a legend swatch names the band (labels inside the panels would cover the data)
            fig.add_trace(go.Scatter(
                x=[None], y=[None], mode="markers", name=f"stage: {row['stage']}", legendgroup="stages",
                marker={"symbol": "square", "size": 12, "color": _rgba(fill, 0.35)}, hoverinfo="skip",
            ))
        return fig
    palette = dict(colors or {})
    for i, model in enumerate(models):
        color = palette.get(model, _PALETTE[i % len(_PALETTE)])
        for _, row in table[table["model"] == model].iterrows():
            if float(row["start"]) > 0:
                fig.add_vline(x=float(row["start"]), line={"color": color, "dash": "dot", "width": 1.5}, **where)
        fig.add_trace(go.Scatter(
            x=[None], y=[None], mode="lines", name=f"{model}: stage boundaries", legendgroup="stages",
            line={"color": color, "dash": "dot", "width": 1.5}, hoverinfo="skip",
        ))
    return fig


def _whisker(fig: go.Figure, low: float, high: float, color: str) -> None:
    """A boundary's interval as a whisker along the top of every panel (each panel's axes named
    here: plotly's ``row="all"`` drops the "domain" of every y reference but the first).
    """
    names = sorted(k for k in fig.layout.to_plotly_json() if k.startswith("xaxis")) or ["xaxis"]
    for name in names:
        suffix = name[len("xaxis"):]
        anchor = fig.layout[name].anchor if fig.layout[name].anchor not in (None, "free") else f"y{suffix}"
        for x0, x1, y0, y1 in ((low, high, 0.97, 0.97), (low, low, 0.94, 1.0), (high, high, 0.94, 1.0)):
            fig.add_shape(type="line", x0=x0, x1=x1, y0=y0, y1=y1, xref=f"x{suffix}", yref=f"{anchor} domain",
                          line={"color": color, "width": 2})


# --------------------------------------------------------------------------------------------
# robustness


def robustness_table(sweep: pd.DataFrame | Result) -> pd.DataFrame:
    """A sweep's summary, which the figure draws: its ``<metric>_sem`` columns (standard errors over
    sequences, computed by the sweep) are the error bands; a summary without them draws none.

    Example:
        >>> import pandas as pd
        >>> s = pd.DataFrame({"kind": ["none", "drop"], "layer": pd.array([None, 0], dtype="Int64"), "kl_nats": [0.0, 2.0]})
        >>> list(robustness_table(s).columns)
        ['kind', 'layer', 'kl_nats']
    """
    return table_of(sweep, "summary")


def robustness(
    results: Results,
    metrics: Sequence[str] = ("kl_nats", "loss_delta", "relative_accuracy", "top1_agreement"),
    kinds: Sequence[str] = ("drop", "swap"),
    stages: Stages = None,
    colors: Mapping[str, str] | None = None,
    log_kl: bool = True,
) -> go.Figure:
    """Damage of deleting each block and swapping each adjacent pair, with ±1 standard-error bands.

    One panel per metric (``kl_nats``, ``loss_delta``, ``relative_accuracy``, ``top1_agreement``,
    ``accuracy``, ``entropy_bits``); solid lines delete, dashed lines swap (plotted at the first
    block of the pair). Bands need the per-token table (:func:`robustness_table`).

    Args:
        results: a sweep result (``robustness_sweep``), its summary, or a list of them.
        metrics: summary columns to draw, one panel each.
        kinds: any of ``"drop"``, ``"swap"``, ``"drop_attention"``, ``"drop_mlp"`` (a kind a
            table lacks is left out).
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.
        log_kl: draw KL on a log axis (its values span several orders of magnitude).

    Example:
        >>> import pandas as pd
        >>> s = pd.DataFrame({"kind": ["none", "drop", "drop", "swap"], "layer": pd.array([None, 0, 1, 0], dtype="Int64"),
        ...                   "relative_depth": [None, 0, 1, 0], "kl_nats": [0, 3, .5, .2]})
        >>> [t.name for t in robustness(s, metrics=["kl_nats"]).data]
        ['model: delete block', 'model: swap with next']
    """
    items = _as_list(results)
    unknown = [m for m in metrics if m not in _METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {unknown or list(metrics)}; allowed: {', '.join(_METRICS)}")
    bad = [k for k in kinds if k not in _KIND_DASH]
    if bad or not kinds:
        raise ValueError(f"unknown kind(s) {bad or list(kinds)}; allowed: {', '.join(map(repr, _KIND_DASH))}")
    palette = model_colors(items, colors)
    n_cols = 2 if len(metrics) > 1 else 1
    n_rows = (len(metrics) + n_cols - 1) // n_cols
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=[_METRICS[m][0] for m in metrics],
                        horizontal_spacing=0.1, vertical_spacing=0.16)
    for result in items:
        table = robustness_table(result)
        require_columns(table, ["kind", "layer", "relative_depth", *metrics], "robustness")
        name = result_model(result)
        for i, metric in enumerate(metrics):
            r, c = i // n_cols + 1, i % n_cols + 1
            for kind in kinds:
                part = table[table["kind"] == kind].sort_values("layer")
                if part.empty:
                    continue
                err = part[f"{metric}_sem"] if f"{metric}_sem" in part else None
                _line(fig, part["relative_depth"], part[metric], f"{name}: {_KIND_NAME[kind]}", palette[name], err,
                      row=r, col=c, dash=_KIND_DASH[kind], showlegend=i == 0,
                      legendgroup=f"{name}:{kind}")
            fig.update_yaxes(title_text=_METRICS[metric][0].split(" (")[-1].rstrip(")"), row=r, col=c)
            if metric == "kl_nats" and log_kl:
                fig.update_yaxes(type="log", tickvals=_LOG_TICKS, ticktext=[f"{v:g}" for v in _LOG_TICKS], row=r, col=c)
    _depth_axes(fig)
    add_stage_bands(fig, stages, palette)
    title = "Robustness: deleting one block or swapping two adjacent blocks" if set(kinds) <= {"drop", "swap"} else \
        "Robustness: " + ", ".join(_KIND_NAME[k] for k in kinds)
    return _layout(fig, title, height=330 * n_rows + 110)


def sublayer_deletion(results: Results, stages: Stages = None, colors: Mapping[str, str] | None = None) -> go.Figure:
    """Deleting a block's attention only (dotted) or its MLP only (dash-dot), beside deleting the
    whole block (solid) where the table has it: KL and top-1 accuracy retained, ±1 s.e.

    Args:
        results: sweep summaries with ``kind`` ``drop_attention`` / ``drop_mlp`` (and ``drop``) rows.
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.

    Example:
        >>> import pandas as pd
        >>> s = pd.DataFrame({"kind": ["none", "drop_attention", "drop_mlp"], "layer": pd.array([None, 0, 0], dtype="Int64"),
        ...                   "relative_depth": [None, 0, 0], "kl_nats": [0, .3, 2], "relative_accuracy": [1, .9, .4]})
        >>> [t.name for t in sublayer_deletion(s).data]
        ['model: delete attention only', 'model: delete MLP only', 'model: delete attention only', 'model: delete MLP only']
    """
    fig = robustness(results, metrics=("kl_nats", "relative_accuracy"), kinds=("drop", "drop_attention", "drop_mlp"),
                     stages=stages, colors=colors)
    return _layout(fig, "Beyond the paper · deleting only a block's attention (dotted) or only its MLP (dash-dot), "
                        "beside the whole block (solid)", height=480)


def layer_effects(results: Results, stages: Stages = None, colors: Mapping[str, str] | None = None) -> go.Figure:
    """The layer-effect matrix (after Csordás et al. 2025), one heatmap per model: for a deleted
    block (x) and each later block (y), how much what the later block writes changes (mean over
    tokens of ``|| c_j(skip i) - c_j || / || c_j ||``, colour on a log scale); below, per block of
    the unmodified model, its contribution's size relative to the residual it reads and their cosine.

    Args:
        results: ``layer_effects`` table(s) of a sweep with deletions
            (:func:`stages_of_inference.robustness.robustness_sweep` with ``layer_effects=True``).
        stages: stage bands for the line panel (:func:`place_stages`) or ``None``.
        colors: model name -> colour.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"kind": ["none", "none", "drop"], "relative_depth": [None, None, 0.0],
        ...                    "block_relative_depth": [0.0, 1.0, 1.0], "relative_change": [0, 0, .4],
        ...                    "relative_size": [2, .5, .6], "cosine": [-.1, .2, .1]})
        >>> [type(t).__name__ for t in layer_effects(df).data]
        ['Heatmap', 'Scatter', 'Scatter']
    """
    items = _as_list(results)
    palette = model_colors(items, colors)
    n = len(items)
    names = [result_model(r) for r in items]
    wide = [{"colspan": n}] + [None] * (n - 1)
    fig = make_subplots(rows=3, cols=n, specs=[[{}] * n, wide, wide], row_heights=[0.56, 0.22, 0.22],
                        vertical_spacing=0.09, horizontal_spacing=0.08,
                        subplot_titles=[f"{name}: change of what block j writes when block i is deleted"
                                        for name in names] + ["the unmodified model: |c_j| / |resid_pre_j|",
                                                              "the unmodified model: cosine(c_j, resid_pre_j)"])
    ticks = [0.01, 0.03, 0.1, 0.3, 1, 3]
    for k, (result, name) in enumerate(zip(items, names), start=1):
        df = table_of(result)
        require_columns(df, ["kind", "relative_depth", "block_relative_depth", "relative_change", "relative_size", "cosine"],
                 "layer_effects")
        drops = df[df["kind"] == "drop"]
        grid = drops.pivot_table(index="block_relative_depth", columns="relative_depth", values="relative_change")
        z = np.log10(grid.to_numpy(dtype=float).clip(min=1e-4))
        fig.add_trace(go.Heatmap(
            x=grid.columns.to_numpy(dtype=float), y=grid.index.to_numpy(dtype=float), z=z, zmin=-2, zmax=0.5,
            colorscale="Viridis", showscale=k == 1, customdata=grid.to_numpy(dtype=float),
            colorbar={"title": "relative change", "tickvals": np.log10(ticks), "ticktext": [f"{t:g}" for t in ticks],
                      "len": 0.5, "y": 0.76},
            hovertemplate=f"{name}<br>deleted block at depth %{{x:.2f}}<br>block at depth %{{y:.2f}}"
                          "<br>relative change %{customdata:.3g}<extra></extra>",
        ), row=1, col=k)
        fig.update_xaxes(title_text="deleted block i, relative depth", range=list(_X_RANGE), row=1, col=k)
        fig.update_yaxes(title_text="later block j, relative depth" if k == 1 else None, range=list(_X_RANGE),
                         row=1, col=k)
        base = df[df["kind"] == "none"].sort_values("block_relative_depth")
        _line(fig, base["block_relative_depth"], base["relative_size"], name, palette[name], row=2, col=1,
              hover=" (|c| / |resid_pre|)")
        _line(fig, base["block_relative_depth"], base["cosine"], name, palette[name], row=3, col=1,
              showlegend=False, hover=" (cosine)")
    fig.update_xaxes(range=list(_X_RANGE), row=2, col=1)
    fig.update_xaxes(title_text=BLOCK_DEPTH, range=list(_X_RANGE), row=3, col=1)
    ratio_ticks = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50]
    fig.update_yaxes(title_text="ratio (log)", type="log", tickvals=ratio_ticks, ticktext=[f"{t:g}" for t in ratio_ticks],
                     row=2, col=1)
    fig.update_yaxes(title_text="cosine", row=3, col=1)
    fig.add_hline(y=0, line={"color": "#888", "width": 1}, row=3, col=1)
    add_stage_bands(fig, stages, palette)
    fig = _layout(fig, "Beyond the paper · the layer-effect matrix: which blocks later blocks depend on", height=1000)
    fig.update_layout(legend={"orientation": "h", "x": 0, "y": -0.07, "yanchor": "top"}, margin={"b": 110})
    return fig


# --------------------------------------------------------------------------------------------
# stage 1


def previous_token_attention(results: Results, stages: Stages = None, colors: Mapping[str, str] | None = None) -> go.Figure:
    """Mean attention weight on each of the previous k tokens, per layer, with ±1 s.e. bands.

    Args:
        results: ``previous_token_attention`` table(s) (``relative_depth``, ``mean_attention``, ``sem``).
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"relative_depth": [0, 1], "mean_attention": [.1, .02], "sem": [0, 0]})
        >>> previous_token_attention(df).layout.yaxis.title.text
        'mean attention weight (fraction)'
    """
    items = _as_list(results)
    palette = model_colors(items, colors)
    fig = go.Figure()
    ks = set()
    for result in items:
        df = table_of(result)
        require_columns(df, ["relative_depth", "mean_attention"], "previous_token_attention")
        df = df.sort_values("relative_depth")
        if "k" in df:
            ks.update(int(k) for k in df["k"].unique())
        name = result_model(result)
        _line(fig, df["relative_depth"], df["mean_attention"], name, palette[name], df.get("sem"))
    _depth_axes(fig)
    fig.update_yaxes(title_text="mean attention weight (fraction)", rangemode="tozero")
    add_stage_bands(fig, stages, palette)
    k_text = f" (k = {', '.join(map(str, sorted(ks)))})" if ks else ""
    return _layout(fig, f"Stage 1 · mean attention weight on each of the previous k tokens{k_text}")


def subjoiner_scores(results: Results | SubjoinerResult | Sequence[SubjoinerResult], stages: Stages = None, colors: Mapping[str, str] | None = None, top: int = 5) -> go.Figure:
    """Every head's subjoiner score: attention from a word's last piece to its earlier pieces,
    minus the same attention in control prompts, against the head's relative depth.

    The ``top`` heads of each model are labelled ``L<layer>H<head>``.

    Args:
        results: ``subjoiner_heads`` result(s) or their ``heads`` tables.
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.
        top: heads to label per model.

    Example:
        >>> import pandas as pd
        >>> h = pd.DataFrame({"layer": [0, 1], "head": [0, 0], "relative_depth": [0, 1], "difference": [.4, .0]})
        >>> subjoiner_scores(h).data[0].mode
        'markers+text'
    """
    items = _as_list(results)
    palette = model_colors(items, colors)
    fig = go.Figure()
    for result in items:
        df = table_of(result, "heads")
        require_columns(df, ["layer", "head", "relative_depth", "difference"], "subjoiner_scores")
        name = result_model(result)
        ranked = df.sort_values("difference", ascending=False).reset_index(drop=True)
        labels = [f"L{int(l)}H{int(h)}" if i < top else "" for i, (l, h) in enumerate(zip(ranked["layer"], ranked["head"]))]
        fig.add_trace(go.Scatter(
            x=ranked["relative_depth"], y=ranked["difference"], mode="markers+text", name=name, text=labels,
            textposition="middle right", textfont={"size": 10, "color": palette[name]},
            marker={"color": palette[name], "size": 7, "opacity": 0.75},
            customdata=np.stack([ranked["layer"], ranked["head"]], axis=1),
            hovertemplate=f"{name} L%{{customdata[0]}}H%{{customdata[1]}}<br>depth %{{x:.2f}}<br>score − control %{{y:.3f}}<extra></extra>",
        ))
    fig.add_hline(y=0, line={"color": "#888", "width": 1})
    _depth_axes(fig)
    fig.update_yaxes(title_text="score − control (attention, fraction)")
    add_stage_bands(fig, stages, palette)
    return _layout(fig, "Stage 1 · subjoiner heads: attention that glues a word's pieces")


def subjoiner_patterns(result: Any, heads: Sequence[tuple[int, int]] | None = None, top: int = 3,
                       ranked: pd.DataFrame | None = None) -> go.Figure:
    """Mean attention patterns of the best subjoiner heads, on multi-piece prompts and on controls.

    Args:
        result: a ``subjoiner_heads`` result, or a long table with ``layer``, ``head``, ``prompts``
            ("subword" or "control"), ``query``, ``key``, ``attention`` (and ``n_pieces``), as the
            study saves it.
        heads: ``(layer, head)`` pairs to draw (default: the ``top`` ranked heads).
        top: how many heads when ``heads`` is not given.
        ranked: the heads table to rank by, for a long table (a result carries its own).

    Example:
        >>> import torch, pandas as pd
        >>> from types import SimpleNamespace
        >>> r = SimpleNamespace(heads=pd.DataFrame({"layer": [0], "head": [1]}), patterns=torch.rand(1, 2, 4, 4),
        ...                     control_patterns=torch.rand(1, 2, 4, 4), n_pieces=3)
        >>> len(subjoiner_patterns(r).data)
        2
    """
    long = _pattern_table(result)
    if ranked is None and not isinstance(result, pd.DataFrame):
        ranked = table_of(result, "heads")
    if heads is None:
        if ranked is None or len(ranked) == 0:
            raise ValueError("no heads table to rank heads by: pass heads=[(layer, head), ...]")
        heads = [(int(l), int(h)) for l, h in ranked[["layer", "head"]].head(top).itertuples(index=False)]
    if not heads:
        raise ValueError("heads is empty: name at least one (layer, head)")
    n_pieces = int(long["n_pieces"].iloc[0]) if "n_pieces" in long.columns and len(long) else 0
    titles = [f"L{l}H{h}: {kind}" for l, h in heads for kind in ("word split into pieces", "control (one-token word)")]
    fig = make_subplots(rows=len(heads), cols=2, subplot_titles=titles, horizontal_spacing=0.12,
                        vertical_spacing=0.12 if len(heads) > 1 else 0.2)
    for i, (layer, head) in enumerate(heads):
        for j, kind in enumerate(("subword", "control")):
            part = long[(long["layer"] == layer) & (long["head"] == head) & (long["prompts"] == kind)]
            if part.empty:
                raise ValueError(f"no pattern for layer {layer} head {head}")
            grid = part.pivot(index="query", columns="key", values="attention").sort_index().sort_index(axis=1)
            w = grid.shape[0]
            ticks = [f"−{w - 1 - q}" if q < w - 1 else "last" for q in range(w)]
            fig.add_trace(go.Heatmap(
                z=grid.to_numpy(), x=ticks, y=ticks, coloraxis="coloraxis",
                hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>",
            ), row=i + 1, col=j + 1)
            fig.update_yaxes(autorange="reversed", title_text="query position (from the end)" if j == 0 else None,
                             row=i + 1, col=j + 1)
            fig.update_xaxes(title_text="key position (from the end)", row=i + 1, col=j + 1)
    fig.update_layout(coloraxis={"colorscale": "Blues", "cmin": 0, "colorbar": {"title": {"text": "attention"}}})
    piece_note = f"; the final word's {n_pieces} pieces are the last {n_pieces} positions" if n_pieces else ""
    return _layout(fig, f"Stage 1 · mean attention patterns of the top subjoiner heads{piece_note}",
                   height=300 * len(heads) + 120)


def _pattern_table(result: Any) -> pd.DataFrame:
    if isinstance(result, pd.DataFrame):
        require_columns(result, ["layer", "head", "prompts", "query", "key", "attention"], "subjoiner_patterns")
        return result
    return pattern_table(result)


# --------------------------------------------------------------------------------------------
# stage 2


def logit_lens(results: Results, stages: Stages = None, colors: Mapping[str, str] | None = None) -> go.Figure:
    """Logit-lens entropy and KL to the final readout, in both lens conventions, with ±1 s.e. bands.

    Columns of panels: the paper's convention (every readout divided by the *final* norm scale)
    and the per-layer-norm convention (each readout normalised by its own statistics); rows:
    entropy in bits and KL(final || readout) in nats. A table's ``convention`` column says which
    column it goes to.

    Args:
        results: ``logit_lens`` table(s), one per (model, convention).
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"relative_depth": [0, 1], "entropy_bits": [15, 4], "kl_to_final_nats": [9, 0], "convention": "paper"})
        >>> len(logit_lens(df).data)
        2
    """
    items = _as_list(results)
    palette = model_colors(items, colors)
    titles = ["entropy · paper convention (final-layer scale)", "entropy · per-layer norm (TransformerLens 3.x)",
              "KL to the output · paper convention", "KL to the output · per-layer norm"]
    fig = make_subplots(rows=2, cols=2, subplot_titles=titles, horizontal_spacing=0.1, vertical_spacing=0.16)
    seen = set()
    for result in items:
        df = table_of(result)
        require_columns(df, ["relative_depth", "entropy_bits", "kl_to_final_nats"], "logit_lens")
        name = result_model(result)
        conventions = df["convention"].unique() if "convention" in df else ["paper"]
        for convention in conventions:
            part = df[df["convention"] == convention] if "convention" in df else df
            part = part.sort_values("relative_depth")
            col = 1 if convention == "paper" else 2
            for row, metric in ((1, "entropy_bits"), (2, "kl_to_final_nats")):
                _line(fig, part["relative_depth"], part[metric], name, palette[name], part.get(f"{metric}_sem"),
                      row=row, col=col, showlegend=name not in seen)
                seen.add(name)
    _depth_axes(fig, READOUT_DEPTH)
    fig.update_yaxes(title_text="entropy (bits)", rangemode="tozero", row=1)
    fig.update_yaxes(title_text="KL (nats)", rangemode="tozero", row=2)
    add_stage_bands(fig, stages, palette)
    return _layout(fig, "Stage 2 · the logit lens: how far each layer is from a prediction", height=760)


def layer_similarity(results: Results) -> go.Figure:
    """Heatmap of the similarity (linear CKA or cosine) between every pair of blocks' outputs.

    Both axes are relative depth, so models of different depth are comparable; several models are
    drawn side by side, one panel each, on one colour scale.

    Args:
        results: ``layer_similarity`` table(s) (``relative_depth_a``, ``relative_depth_b``, ``similarity``).

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"relative_depth_a": [0, 0, 1, 1], "relative_depth_b": [0, 1, 0, 1], "similarity": [1, .5, .5, 1], "method": "cka"})
        >>> layer_similarity(df).data[0].type
        'heatmap'
    """
    items = _as_list(results)
    names = [result_model(r) for r in items]
    fig = make_subplots(rows=1, cols=len(items), subplot_titles=names, horizontal_spacing=0.08)
    method = "cka"
    for i, result in enumerate(items):
        df = table_of(result)
        require_columns(df, ["relative_depth_a", "relative_depth_b", "similarity"], "layer_similarity")
        method = str(df["method"].iloc[0]) if "method" in df and len(df) else method
        grid = df.pivot(index="relative_depth_a", columns="relative_depth_b", values="similarity").sort_index().sort_index(axis=1)
        fig.add_trace(go.Heatmap(
            z=grid.to_numpy(), x=grid.columns.to_numpy(float), y=grid.index.to_numpy(float), coloraxis="coloraxis",
            hovertemplate="depth %{y:.2f} vs %{x:.2f}<br>similarity %{z:.3f}<extra></extra>",
        ), row=1, col=i + 1)
        fig.update_xaxes(title_text=BLOCK_DEPTH, row=1, col=i + 1, constrain="domain")
        fig.update_yaxes(title_text=BLOCK_DEPTH if i == 0 else None, row=1, col=i + 1, autorange="reversed",
                         scaleanchor=f"x{'' if i == 0 else i + 1}", constrain="domain")
    label = "linear CKA (unbiased)" if method == "cka" else "mean cosine similarity"
    fig.update_layout(coloraxis={"colorscale": "Viridis", "cmax": 1, "colorbar": {"title": {"text": label}}})
    return _layout(fig, f"Stage 2 · similarity of the blocks' outputs ({label})", height=480)


def probe_accuracy(results: Results, stages: Stages = None, colors: Mapping[str, str] | None = None) -> go.Figure:
    """Held-out accuracy of a linear probe at every readout, beside the majority-class baseline.

    Args:
        results: ``probe_layers`` table(s) (``relative_depth``, ``accuracy``, ``baseline``, ``label``).
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"relative_depth": [0, 1], "accuracy": [.7, .9], "baseline": [.6, .6], "label": "x"})
        >>> [t.name for t in probe_accuracy(df).data]
        ['model: x', 'model: majority baseline']
    """
    items = _as_list(results)
    palette = model_colors(items, colors)
    fig = go.Figure()
    for result in items:
        df = table_of(result)
        require_columns(df, ["relative_depth", "accuracy", "baseline"], "probe_accuracy")
        df = df.sort_values("relative_depth")
        name = result_model(result)
        label = str(df["label"].iloc[0]) if "label" in df and len(df) else "probe"
        _line(fig, df["relative_depth"], df["accuracy"], f"{name}: {label}", palette[name])
        fig.add_trace(go.Scatter(x=df["relative_depth"], y=df["baseline"], mode="lines", name=f"{name}: majority baseline",
                                 line={"color": palette[name], "dash": "dot", "width": 1}))
    _depth_axes(fig, READOUT_DEPTH)
    fig.update_yaxes(title_text="held-out probe accuracy (fraction)")
    add_stage_bands(fig, stages, palette)
    return _layout(fig, "Stage 2 · linear probes on the residual stream")


# --------------------------------------------------------------------------------------------
# stage 3


def neuron_counts(
    results: Results, share: bool = False, stages: Stages = None, colors: Mapping[str, str] | None = None
) -> go.Figure:
    """Prediction and suppression neurons per layer (kurtosis of the output weights' vocabulary
    cosines above the threshold; positive skew = prediction, negative = suppression).

    Args:
        results: ``neuron_counts`` table(s) (:func:`~stages_of_inference.stages.prediction_ensembling.neuron_counts`).
        share: plot the share of the layer's neurons (comparable across widths) instead of counts.
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.

    Example:
        >>> import pandas as pd
        >>> from stages_of_inference.stages.prediction_ensembling import neuron_counts as count
        >>> m = pd.DataFrame({"layer": [0, 1, 1], "kind": ["other", "prediction", "suppression"]})
        >>> [t.name for t in neuron_counts(count(m, n_layers=2)).data]
        ['model: prediction', 'model: suppression']
    """
    items = _as_list(results)
    palette = model_colors(items, colors)
    fig = go.Figure()
    for result in items:
        df = _counts(result)
        name = result_model(result)
        for kind, dash in (("prediction", "solid"), ("suppression", "dash")):
            y = df[f"share_{kind}"] * 100 if share else df[f"n_{kind}"]
            _line(fig, df["relative_depth"], y, f"{name}: {kind}", palette[name], dash=dash)
    _depth_axes(fig)
    fig.update_yaxes(title_text="share of the layer's neurons (%)" if share else "neurons per layer (count)",
                     rangemode="tozero")
    add_stage_bands(fig, stages, palette)
    return _layout(fig, "Stage 3 · prediction (solid) and suppression (dashed) neurons")


def _counts(result: Any) -> pd.DataFrame:
    df = table_of(result, "counts")
    require_columns(df, ["relative_depth", "n_prediction", "n_suppression", "share_prediction", "share_suppression"],
             "neuron_counts (the table of stages.prediction_ensembling.neuron_counts)")
    return df.sort_values("relative_depth")


# --------------------------------------------------------------------------------------------
# stage 4


def sharpening_profile(results: Results, stages: Stages = None, colors: Mapping[str, str] | None = None) -> go.Figure:
    """What each block does to the output distribution: change in lens entropy (bits) and in top-1
    confidence, beside its share of suppression neurons.

    Args:
        results: ``sharpening_profile`` table(s).
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"relative_depth": [0, 1], "entropy_change_bits": [0, -1], "confidence_change": [0, .1]})
        >>> len(sharpening_profile(df).data)
        2
    """
    items = _as_list(results)
    palette = model_colors(items, colors)
    has_share = all("share_suppression" in table_of(r) for r in items)
    panels = ["entropy change caused by the block (bits)", "top-1 confidence change (probability)"]
    if has_share:
        panels.append("suppression neurons (% of the block's neurons)")
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=panels, vertical_spacing=0.09)
    conventions = set()
    for result in items:
        df = table_of(result)
        require_columns(df, ["relative_depth", "entropy_change_bits", "confidence_change"], "sharpening_profile")
        df = df.sort_values("relative_depth")
        if "convention" in df:
            conventions.update(df["convention"].unique())
        name = result_model(result)
        _line(fig, df["relative_depth"], df["entropy_change_bits"], name, palette[name], row=1, col=1)
        _line(fig, df["relative_depth"], df["confidence_change"], name, palette[name], row=2, col=1, showlegend=False)
        if has_share:
            _line(fig, df["relative_depth"], df["share_suppression"] * 100, name, palette[name], row=3, col=1,
                  showlegend=False)
    for r in range(1, len(panels) + 1):
        fig.add_hline(y=0, line={"color": "#888", "width": 1}, row=r, col=1)
    fig.update_yaxes(title_text="Δ entropy (bits)", row=1, col=1)
    fig.update_yaxes(title_text="Δ confidence", row=2, col=1)
    if has_share:
        fig.update_yaxes(title_text="%", rangemode="tozero", row=3, col=1)
    fig.update_xaxes(range=list(_X_RANGE))
    fig.update_xaxes(title_text=BLOCK_DEPTH, row=len(panels), col=1)
    add_stage_bands(fig, stages, palette)
    lens = f" (lens: {', '.join(sorted(conventions))})" if conventions else ""
    return _layout(fig, f"Stage 4 · residual sharpening: what each block does to the prediction{lens}",
                   height=250 * len(panels) + 120)


def layer_repetition(results: Results, stages: Stages = None, colors: Mapping[str, str] | None = None) -> go.Figure:
    """Output entropy and KL to the original when blocks are run twice in place.

    A table with ``layer`` / ``relative_depth`` (one block repeated, as the study runs it) is drawn
    per block; a ``layer_repetition`` table (a range ``start .. end - 1`` repeated) at the depth of
    the last repeated block.

    Args:
        results: repetition table(s).
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"relative_depth": [0, 1], "entropy_change_bits": [2, .1], "kl_nats": [3, .2]})
        >>> len(layer_repetition(df).data)
        2
    """
    items = _as_list(results)
    palette = model_colors(items, colors)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["output entropy change (bits)", "KL(original || repeated) (nats)"],
                        horizontal_spacing=0.1)
    for result in items:
        df = table_of(result)
        depth = "relative_depth" if "relative_depth" in df else "relative_depth_end"
        require_columns(df, [depth, "entropy_change_bits", "kl_nats"], "layer_repetition")
        df = df.dropna(subset=[depth]).sort_values(depth)
        name = result_model(result)
        _line(fig, df[depth], df["entropy_change_bits"], name, palette[name], df.get("entropy_change_bits_sem"),
              row=1, col=1)
        _line(fig, df[depth], df["kl_nats"], name, palette[name], df.get("kl_nats_sem"), row=1, col=2, showlegend=False)
    fig.add_hline(y=0, line={"color": "#888", "width": 1}, row=1, col=1)
    _depth_axes(fig, BLOCK_DEPTH + " of the repeated block")
    fig.update_yaxes(title_text="Δ entropy (bits)", row=1, col=1)
    fig.update_yaxes(title_text="KL (nats)", type="log", tickvals=_LOG_TICKS, ticktext=[f"{v:g}" for v in _LOG_TICKS],
                     row=1, col=2)
    add_stage_bands(fig, stages, palette)
    return _layout(fig, "Stage 4 · layer repetition: one block run twice in place", height=440)


def sink_profile(results: Results, stages: Stages = None, colors: Mapping[str, str] | None = None) -> go.Figure:
    """Before each block: the attention paid to the first token (and the share of sink heads), the
    largest residual activation over the median one, and the mean residual norm.

    Args:
        results: ``sink_profile`` table(s) (:func:`stages_of_inference.stages.sinks.sink_profile`).
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"relative_depth": [0, 1], "sink_attention": [.1, .8], "sink_heads_share": [0, .9],
        ...                    "massive_ratio": [10, 900], "resid_norm": [1, 30]})
        >>> len(sink_profile(df).data)
        4
    """
    items = _as_list(results)
    palette = model_colors(items, colors)
    panels = ["attention to the first token: mean weight (solid) and share of heads above 0.5 (dotted)",
              "largest |activation| entering the block / median |activation|",
              "mean residual norm entering the block (positions after the first)"]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, subplot_titles=panels, vertical_spacing=0.09)
    for result in items:
        df = table_of(result)
        require_columns(df, ["relative_depth", "sink_attention", "sink_heads_share", "massive_ratio", "resid_norm"],
                 "sink_profile")
        df = df.sort_values("relative_depth")
        name = result_model(result)
        _line(fig, df["relative_depth"], df["sink_attention"], name, palette[name], df.get("sink_attention_sem"),
              row=1, col=1)
        _line(fig, df["relative_depth"], df["sink_heads_share"], name, palette[name], row=1, col=1, dash="dot",
              showlegend=False, hover=" (share of sink heads)")
        _line(fig, df["relative_depth"], df["massive_ratio"], name, palette[name], row=2, col=1, showlegend=False)
        _line(fig, df["relative_depth"], df["resid_norm"], name, palette[name], df.get("resid_norm_sem"), row=3, col=1,
              showlegend=False)
    fig.update_yaxes(title_text="fraction", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="ratio (log)", type="log", row=2, col=1)
    fig.update_yaxes(title_text="L2 norm", rangemode="tozero", row=3, col=1)
    fig.update_xaxes(range=list(_X_RANGE))
    fig.update_xaxes(title_text=BLOCK_DEPTH, row=3, col=1)
    add_stage_bands(fig, stages, palette)
    return _layout(fig, "Beyond the paper · attention sinks, massive activations and residual norms", height=870)


def prediction_depth(results: Results, stages: Stages = None, colors: Mapping[str, str] | None = None) -> go.Figure:
    """Where tokens' predictions settle: the share of tokens whose prediction depth is each lens
    readout; solid: all tokens, dashed: those the model gets right, dotted: those it gets wrong.

    The two lens conventions give the same depths (they differ by a positive factor per token,
    which leaves every top-1 unchanged), so one is drawn: ``per_layer_norm`` where a table has it.

    Args:
        results: prediction-depth distribution table(s)
            (:func:`stages_of_inference.stages.feature_engineering.prediction_depth`).
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"relative_depth": [0, .5, 1], "share": [.1, .2, .7], "share_right": [.2, .3, .5],
        ...                    "share_wrong": [0, .1, .9], "convention": "paper"})
        >>> len(prediction_depth(df).data)
        3
    """
    items = _as_list(results)
    palette = model_colors(items, colors)
    fig = go.Figure()
    for result in items:
        df = table_of(result)
        require_columns(df, ["relative_depth", "share", "share_right", "share_wrong", "convention"], "prediction_depth")
        convention = "per_layer_norm" if (df["convention"] == "per_layer_norm").any() else df["convention"].iloc[0]
        part = df[df["convention"] == convention].sort_values("relative_depth")
        name = result_model(result)
        _line(fig, part["relative_depth"], part["share"], name, palette[name])
        _line(fig, part["relative_depth"], part["share_right"], name, palette[name], dash="dash", showlegend=False,
              hover=" (tokens the model gets right)")
        _line(fig, part["relative_depth"], part["share_wrong"], name, palette[name], dash="dot", showlegend=False,
              hover=" (tokens it gets wrong)")
    _depth_axes(fig, READOUT_DEPTH)
    fig.update_yaxes(title_text="share of tokens (fraction)", rangemode="tozero")
    add_stage_bands(fig, stages, palette)
    return _layout(fig, "Beyond the paper · prediction depth: the readout from which the top-1 stays the final one "
                        "(solid: all tokens; dashed: right; dotted: wrong)", height=460)


_TASK_MEASURES = (("token_retained", "solid", "token-level accuracy"), ("cloze_retained", "dash", "cloze accuracy"),
                  ("generation_retained", "dot", "shared greedy continuation"))


def task_damage(results: Results, stages: Stages = None, colors: Mapping[str, str] | None = None) -> go.Figure:
    """What each deletion (left) and swap (right) keeps, as a share of the unmodified model's:
    token-level top-1 accuracy (solid), cloze accuracy (dashed) and the greedy continuation it
    shares (dotted) (token-level accuracy: the table's, the main sweep's in the study).

    Args:
        results: ``task_damage`` table(s) (:func:`stages_of_inference.stages.task_damage.task_damage`).
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"kind": ["none", "drop", "drop", "swap"], "relative_depth": [None, 0, 1, 0],
        ...                    "token_retained": [1, .2, .9, .5], "cloze_retained": [1, 0, .5, .3],
        ...                    "generation_retained": [1, .1, .6, .4]})
        >>> len(task_damage(df).data)
        6
    """
    items = _as_list(results)
    palette = model_colors(items, colors)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=["deleting block i", "swapping blocks i and i + 1"])
    for result in items:
        df = table_of(result)
        require_columns(df, ["kind", "relative_depth", *(m for m, _, _ in _TASK_MEASURES)], "task_damage")
        name = result_model(result)
        for col, kind in ((1, "drop"), (2, "swap")):
            part = df[df["kind"] == kind].sort_values("relative_depth")
            for measure, dash, what in _TASK_MEASURES:
                _line(fig, part["relative_depth"], part[measure], name, palette[name], row=1, col=col, dash=dash,
                      showlegend=col == 1 and measure == "token_retained", hover=f" ({what} retained)")
    fig.add_hline(y=1, line={"color": "#888", "width": 1})
    _depth_axes(fig)
    fig.update_yaxes(title_text="share of the unmodified model's (fraction)", rangemode="tozero", row=1, col=1)
    add_stage_bands(fig, stages, palette)
    return _layout(fig, "Beyond the paper · what a deletion or a swap keeps: token accuracy (solid), cloze accuracy "
                        "(dashed), shared greedy continuation (dotted)", height=460)


# --------------------------------------------------------------------------------------------
# beyond the paper: contiguous deletions and competing readings

_RUN_COLORS = ("#08306b", "#2171b5", "#4292c6", "#6baed6", "#fd8d3c", "#e6550d", "#a63603", "#7f2704")


def contiguous_deletions(results: Results, stages: Stages = None, colors: Mapping[str, str] | None = None) -> go.Figure:
    """Deleting ``k`` adjacent blocks: KL against the relative depth of the run's first block, one
    curve per ``k`` (``k = 1``: single blocks), one panel per model; the y axis is logarithmic.

    Args:
        results: run table(s) (:func:`stages_of_inference.robustness.run_table`, with ``k = 1``
            rows for single deletions if wanted), one per model.
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour (the curves are coloured by ``k``; unused but for the bands).

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"k": [1, 1, 2], "relative_depth": [0, 1, 0], "kl_nats": [.5, .2, .9], "kl_nats_sem": 0.})
        >>> len(contiguous_deletions(df).data)
        4
    """
    items = _as_list(results)
    palette = model_colors(items, colors)
    names = [result_model(r) for r in items]
    fig = make_subplots(rows=len(items), cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=[f"{name}: KL of deleting k adjacent blocks" for name in names])
    for row, result in enumerate(items, start=1):
        df = table_of(result)
        require_columns(df, ["k", "relative_depth", "kl_nats"], "contiguous_deletions")
        for i, (k, part) in enumerate(df.sort_values(["k", "relative_depth"]).groupby("k", sort=True)):
            color = _RUN_COLORS[i % len(_RUN_COLORS)]
            _line(fig, part["relative_depth"], part["kl_nats"].clip(lower=1e-4), f"k = {int(k)}", color,
                  part.get("kl_nats_sem"), row=row, col=1, legendgroup=f"k{int(k)}", showlegend=row == 1,
                  hover=" nats")
        fig.update_yaxes(title_text="KL (nats, log)", type="log", row=row, col=1)
    fig.update_xaxes(range=list(_X_RANGE))
    fig.update_xaxes(title_text="relative depth of the run's first block (block i / (n_layers - 1))",
                     row=len(items), col=1)
    add_stage_bands(fig, stages, palette)
    return _layout(fig, "Beyond the paper · deleting runs of adjacent blocks", height=360 + 300 * len(items))


def competing_readings(readouts: Results, blocks: Results, stages: Stages = None,
                       colors: Mapping[str, str] | None = None) -> go.Figure:
    """Mix-Compress-Refine's signals and the pruning proxies against depth.

    Panels: the first token's residual norm at every readout (log); the matrix-based entropy of
    the token representations at every readout; per block, each proxy of
    :data:`~stages_of_inference.stages.competing.PROXIES` and the deletion KL (``deletion_kl``
    where the blocks table has it), each divided by its largest value so one axis holds them.

    Args:
        readouts: ``readouts`` table(s) of :func:`~stages_of_inference.stages.competing.depth_proxies`.
        blocks: its ``blocks`` table(s), in the same model order.
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.

    Example:
        >>> import pandas as pd
        >>> r = pd.DataFrame({"relative_depth": [0, .5, 1], "bos_norm": [1, 90, 80], "matrix_entropy": [.9, .2, .5]})
        >>> b = pd.DataFrame({"relative_depth": [0, 1], "block_influence": [.4, .1], "angular_distance": [.3, .1],
        ...                   "relative_update": [2, .5], "deletion_kl": [3, .4]})
        >>> len(competing_readings(r, b).data)
        6
    """
    reads, items = _as_list(readouts), _as_list(blocks)
    palette = model_colors(reads, colors)
    panels = ["the first token's residual norm (log)", "matrix-based entropy of the token representations (normalised)",
              "per block, each divided by its largest value: deletion KL (thick) and the proxies"]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, subplot_titles=panels, vertical_spacing=0.09)
    dashes = dict(zip(PROXIES, ("dash", "dot", "dashdot")))
    for read, block in zip(reads, items):
        r, b = table_of(read).sort_values("relative_depth"), table_of(block).sort_values("relative_depth")
        require_columns(r, ["relative_depth", "bos_norm", "matrix_entropy"], "competing_readings")
        require_columns(b, ["relative_depth", *PROXIES], "competing_readings")
        name = result_model(read)
        color = palette.get(name, _PALETTE[0])
        _line(fig, r["relative_depth"], r["bos_norm"], name, color, row=1, col=1)
        _line(fig, r["relative_depth"], r["matrix_entropy"], name, color, r.get("matrix_entropy_sem"), row=2, col=1,
              showlegend=False)
        if "deletion_kl" in b:
            fig.add_trace(go.Scatter(x=b["relative_depth"], y=b["deletion_kl"] / b["deletion_kl"].max(), mode="lines",
                                     name=f"{name}: deletion KL", line={"color": color, "width": 4}, opacity=0.5,
                                     legendgroup=f"{name} kl"), row=3, col=1)
        for proxy in PROXIES:
            top = float(b[proxy].max())
            _line(fig, b["relative_depth"], b[proxy] / top if top > 0 else b[proxy], f"{name}: {proxy.replace('_', ' ')}",
                  color, row=3, col=1, dash=dashes[proxy])
    fig.update_yaxes(title_text="L2 norm", type="log", row=1, col=1)
    fig.update_yaxes(title_text="entropy / log T", range=[0, 1.02], row=2, col=1)
    fig.update_yaxes(title_text="fraction of largest", range=[0, 1.05], row=3, col=1)
    fig.update_xaxes(range=list(_X_RANGE))
    fig.update_xaxes(title_text="relative depth (readout k / n_layers in the top two panels; block i / (n_layers - 1) "
                                "in the last)", row=3, col=1)
    add_stage_bands(fig, stages, palette)
    return _layout(fig, "Beyond the paper · competing readings of depth: Mix-Compress-Refine and pruning proxies",
                   height=940)


def guess_then_refine(buckets: Results, stages: Stages = None) -> go.Figure:
    """Guess then refine on one model: per lens readout, the share of the lens's top-1 guesses in
    each frequency bucket, and the lens's top-1 accuracy on the tokens of each bucket.

    Args:
        buckets: the ``buckets`` table of :func:`~stages_of_inference.stages.guesses.guess_then_refine`.
        stages: stage bands (:func:`place_stages`) or ``None``.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"relative_depth": [0, 0, 1, 1], "bucket": ["top 10", "rarer"] * 2,
        ...                   "guess_share": [.7, .3, .4, .6], "accuracy": [.2, 0, .5, .3]})
        >>> len(guess_then_refine(t).data)
        4
    """
    table = table_of(buckets)
    require_columns(table, ["relative_depth", "bucket", "guess_share", "accuracy"], "guess_then_refine")
    panels = ["share of the lens's top-1 guesses, by how frequent the guessed token is",
              "lens top-1 accuracy, by how frequent the true next token is"]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, subplot_titles=panels, vertical_spacing=0.1)
    for i, (bucket, rows) in enumerate(table.groupby("bucket", sort=False)):
        rows = rows.sort_values("relative_depth")
        color = _PALETTE[i % len(_PALETTE)]
        label = f"frequency rank {bucket}" if bucket[0].isdigit() or bucket.startswith("top") else f"{bucket} tokens"
        _line(fig, rows["relative_depth"], 100 * rows["guess_share"], label, color, row=1, col=1, legendgroup=bucket)
        _line(fig, rows["relative_depth"], 100 * rows["accuracy"], label, color, row=2, col=1, legendgroup=bucket,
              showlegend=False)
    fig.update_yaxes(title_text="% of scored tokens", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="% correct", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(range=list(_X_RANGE))
    fig.update_xaxes(title_text=READOUT_DEPTH, row=2, col=1)
    add_stage_bands(fig, stages)
    return _layout(fig, f"Beyond the paper · guess then refine ({result_model(buckets)})", height=760)


_LENS_DASH = {"paper": "dot", "per_layer_norm": "dash", "tuned": "solid"}
_LENS_LABEL = {"paper": "logit lens, paper convention", "per_layer_norm": "logit lens, per-layer norm",
               "tuned": "tuned lens"}


def lens_comparison(results: Results, stages: Stages = None, colors: Mapping[str, str] | None = None) -> go.Figure:
    """The tuned lens against the logit lens: KL(output || readout) in nats (log scale) and the
    lens's top-1 accuracy at every readout, one line per model and lens (solid: tuned; dashed:
    per-layer norm; dotted: paper convention).

    Args:
        results: ``logit_lens`` table(s) of any conventions (``convention`` column ``"paper"``,
            ``"per_layer_norm"`` or ``"tuned"``).
        stages: stage bands (:func:`place_stages`) or ``None``.
        colors: model name -> colour.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"relative_depth": [0, 1] * 2, "kl_to_final_nats": [9, 0, 3, 0], "accuracy": [.1, .4, .2, .4],
        ...                    "convention": ["per_layer_norm"] * 2 + ["tuned"] * 2})
        >>> [t.name for t in lens_comparison(df).data][::2]
        ['model: logit lens, per-layer norm', 'model: tuned lens']
    """
    items = _as_list(results)
    palette = model_colors(items, colors)
    panels = ["KL(output ‖ readout), nats, log scale (the output itself, KL 0, is left out)",
              "top-1 accuracy of the lens (fraction of scored tokens)"]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, subplot_titles=panels, vertical_spacing=0.1)
    for result in items:
        df = table_of(result)
        require_columns(df, ["relative_depth", "kl_to_final_nats", "accuracy", "convention"], "lens_comparison")
        name = result_model(result)
        for convention, part in df.groupby("convention", sort=False):
            part = part.sort_values("relative_depth")
            label, dash = f"{name}: {_LENS_LABEL.get(convention, convention)}", _LENS_DASH.get(convention, "dashdot")
            inner = part[part["kl_to_final_nats"] > 0]
            _line(fig, inner["relative_depth"], inner["kl_to_final_nats"], label, palette[name], row=1, col=1, dash=dash,
                  legendgroup=label)
            _line(fig, part["relative_depth"], part["accuracy"], label, palette[name], row=2, col=1, dash=dash,
                  legendgroup=label, showlegend=False)
    fig.update_yaxes(title_text="KL (nats)", type="log", row=1, col=1)
    fig.update_yaxes(title_text="accuracy (fraction)", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(range=list(_X_RANGE))
    fig.update_xaxes(title_text=READOUT_DEPTH, row=2, col=1)
    add_stage_bands(fig, stages, palette)
    return _layout(fig, "Beyond the paper · the tuned lens against the logit lens", height=760)
