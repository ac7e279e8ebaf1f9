"""The report: ``report.html`` (self-contained: plotly.js embedded once) and static figures."""

from __future__ import annotations

import html
import os
import time
from pathlib import Path
from typing import Any

import plotly
from plotly.offline import get_plotlyjs

from stages_of_inference import __version__, plots
from stages_of_inference._utils import atomic_path, atomic_write_text
from stages_of_inference.study.folder import FIGURES_DIR, REPORT_GENERATOR
from stages_of_inference.study.readings import read_precision, read_signals, read_stages
from stages_of_inference.study.registry import REGISTRY, Study, Style

__all__ = ["build_report"]


def _figures(study: Study) -> list[tuple[str, str, Any, str]]:
    """(name, title, figure, reading) for every figure the study's results allow, in registry order.
    A figure that cannot be drawn from the results says why instead.
    """
    tables = [t for t in study.stages.values() if t is not None and not t.empty]
    style = Style(tables or None, plots.palette(list(study.results)))
    out: list[tuple[str, str, Any, str]] = []
    for analysis in REGISTRY.values():
        for figure in analysis.figures(study, style):
            try:
                fig = figure.draw()
            except (ValueError, KeyError) as error:
                out.append((figure.name, figure.title, None, f"<p class='note'>Not drawn: {html.escape(str(error))}</p>"))
                continue
            out.append((figure.name, figure.title, fig, figure.reading()))
    return out


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.5}
h1{font-size:1.7em;margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.figure{margin:1em 0 2em} .reading{background:#f7f7f9;border-left:3px solid #4c78a8;padding:.4em 1em;margin:.5em 0}
.note{color:#a33} table{border-collapse:collapse;font-size:.9em;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
pre{background:#f7f7f9;padding:.6em;overflow-x:auto;font-size:.85em} .small{font-size:.85em;color:#555}
"""


def _provenance_table(study: Study) -> str:
    rows = []
    versions: dict[str, set[str]] = {}
    for name, done in study.results.items():
        for analysis, result in done.items():
            p = result.provenance
            m = p.get("model", {})
            tok = p.get("tokens", {})
            for k, val in p.get("versions", {}).items():
                versions.setdefault(k, set()).add(str(val))
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in (
                name, analysis, m.get("n_layers", ""), m.get("config_hash", ""),
                f"{tok.get('n_sequences', '')} × {tok.get('seq_len', '')}" if tok else "weights only / prompts",
                tok.get("sha256", ""), p.get("created_utc", ""), _time_text(study, name, analysis, p),
            )) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("model", "analysis", "blocks", "config hash", "tokens", "tokens sha256",
                                             "created (UTC)", "time"))
    used = "; ".join(f"{k} {', '.join(sorted(v))}" for k, v in versions.items())
    return (f"<table><tr>{head}</tr>{''.join(rows)}</table>"
            f"<p class='small'>Versions: {html.escape(used)}.</p>")


def _time_text(study: Study, name: str, analysis: str, record: dict[str, Any]) -> str:
    seconds = record.get("study_seconds")
    text = "–" if seconds is None else f"{float(seconds):.0f} s"
    return f"{text} (reused)" if (name, analysis) in study.reused else text


def build_report(study: Study, tmp_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``report.html`` (and static figures where an exporter works) for a study's results.

    The HTML is self-contained: plotly.js is embedded once in the page head, each figure is a
    ``<div>`` drawn by it, no file or network is needed to read it. Files are written atomically,
    through temporaries in ``tmp_dir`` (a study folder's private one while a run holds it) or
    beside them.

    Example:
        >>> build_report(load_study("reports/smollm2-135m"))  # doctest: +SKIP
        PosixPath('reports/smollm2-135m/report.html')
    """
    figures = _figures(study)
    study.figures = {name: fig for name, _, fig, _ in figures if fig is not None}
    study.readings = {name: reading for name, _, _, reading in figures}
    sections = []
    for name, title, fig, reading in figures:
        body = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}",
                           config={"displaylogo": False, "responsive": True}) if fig is not None else ""
        sections.append(f"<section class='figure' id='{html.escape(name)}'><h2>{html.escape(title)}</h2>{body}"
                        f"<div class='reading'>{reading}</div></section>")
    study.static_note = _write_static(study, tmp_dir)
    models = ", ".join(study.results)
    config = study.config
    stage_text = read_stages(study)
    precision_text = read_precision(study)
    signals_text = read_signals(study)
    signals_section = (f"<h3>The same boundaries, by the signals beyond the paper</h3><div class='reading'>{signals_text}</div>"
                       if signals_text else "")
    precision_section = (f"<h2>Precision: {html.escape(config.precision)} against fp32</h2><p>The models' matrix products "
                         f"and attention ran in {html.escape(config.precision)}; residual streams and every metric in "
                         "fp32. The sweep re-ran a fixed subset of its plans in fp32 on its first sequences:</p>"
                         f"<div class='reading'>{precision_text}</div>") if precision_text else ""
    left_out = ", ".join(f"{a} ({m})" for m, a in study.left_out)
    left_section = (f"<p class='note'>Left out, because they were registered as needing TransformerLens' "
                    f"HookedTransformer and these models ran on the TransformerBridge backend: "
                    f"{html.escape(left_out)}.</p>") if left_out else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{REPORT_GENERATOR}<title>Stages of inference: {html.escape(models)}</title>
<style>{_CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body>
<h1>Stages of inference: {html.escape(models)}</h1>
<p class="small">Written by stages_of_inference {__version__} (plotly {plotly.__version__}) on
{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. It reproduces the experiments of Lad, Lee, Gurnee &amp; Tegmark,
<i>The Remarkable Robustness of LLMs: Stages of Inference?</i> (arXiv:2406.19384). Corpus: {html.escape(config.corpus)};
{config.n_sequences} sequences of {config.seq_len} tokens (BOS first), the lens, sharpening and repetition analyses on the
first {config.heavy_sequences}. Metrics are taken on positions 1..T−2 of each sequence. Every x axis is relative depth,
so models of different depth line up.</p>
<h2>Where the data places the four stages</h2>
<p>Shaded bands in the figures (dotted boundaries, one colour per model, when several models are shown). The rule: a
block is <i>fragile</i> when deleting it costs more than 3 × the median deletion KL. Detokenization ends after the
leading fragile blocks and after the first peak of previous-token attention; prediction ensembling starts at the first
block after which the paper-convention logit-lens entropy has fallen by a quarter of its total fall; residual
sharpening is the trailing run of blocks that are fragile or hold more suppression than prediction neurons.</p>
<div class="reading">{stage_text or 'No stage placement: the study ran none of the analyses it needs.'}</div>
{signals_section}
{left_section}
{precision_section}
{''.join(sections)}
<h2>Provenance</h2>
{_provenance_table(study)}
<p class="small">Data files: one folder per model and analysis under this report's folder
(<code>&lt;model&gt;/&lt;analysis&gt;/&lt;table&gt;.{config.table_format}</code>, each with a JSON provenance file).
{html.escape(study.static_note)}</p>
<h2>Settings</h2>
<pre>{html.escape(config.to_json())}</pre>
<p class="small">Cite: Lad, V., Lee, J. H., Gurnee, W. &amp; Tegmark, M. (2024). The Remarkable Robustness of LLMs:
Stages of Inference? arXiv:2406.19384; and this library (CITATION.cff).</p>
</body></html>
"""
    atomic_write_text(study.report, page, tmp_dir)
    return study.report


def _write_static(study: Study, tmp_dir: str | os.PathLike[str] | None) -> str:
    """Static copies of the figures when kaleido (and a browser for it) works here; else a note."""
    if not study.config.static_formats:
        return "Static figures: not asked for."
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return "Static figures: not written (install kaleido for PNG/SVG copies)."
    folder = study.out_dir / FIGURES_DIR
    written = 0
    for name, fig in study.figures.items():
        for fmt in study.config.static_formats:
            try:
                with atomic_path(folder / f"{name}.{fmt}", tmp_dir) as tmp:
                    fig.write_image(str(tmp), format=fmt, width=1200, height=int(fig.layout.height or 500), scale=1)
                written += 1
            except Exception as error:  # kaleido without a usable browser, and the like
                return f"Static figures: stopped after {written} ({type(error).__name__}: {str(error).splitlines()[0][:160]})."
    return f"Static figures: {written} files in figures/."
