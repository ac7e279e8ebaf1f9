"""Screenshot one figure of a finished study's report as a PNG, in headless Chromium.

    .venv/bin/python tools/figure_shot.py reports/smollm2-135m sink_profile docs/assets/sink-profile.png

FIGURE is the figure's name in the report (its anchor: ``robustness``, ``logit_lens``,
``prediction_depth``, ``sink_profile``, ...). The figure is the report's own, drawn with the study's
stage bands and colours, rendered by Debian's ``chromium`` from a one-figure HTML page (no static
exporter needed), at the figure's own height.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from stages_of_inference.study import load_study
from stages_of_inference.study.html import _figures

WIDTH = 1200


def render_png(fig: Any, out_png: str, width: int, height: int) -> None:
    """Screenshot plotly figure ``fig`` at ``width`` x ``height`` into ``out_png`` with headless Chromium."""
    fig.update_layout(width=width, height=height)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "figure.html"
        fig.write_html(page, include_plotlyjs=True, full_html=True, config={"displayModeBar": False})
        shot = Path(tmp) / "figure.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={width},{height + 20}", "--virtual-time-budget=10000",
                        f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=300)
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, out_png)
    print(f"wrote {out_png}")


def main(study_dir: str, name: str, out_png: str) -> None:
    """Draw figure ``name`` of the study in ``study_dir`` into ``out_png``."""
    figures = {n: fig for n, _, fig, _ in _figures(load_study(study_dir)) if fig is not None}
    if name not in figures:
        raise SystemExit(f"no figure {name!r} in {study_dir}; it has: {', '.join(figures)}")
    fig = figures[name]
    render_png(fig, out_png, WIDTH, int(fig.layout.height or 500))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
