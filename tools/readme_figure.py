"""Draw the README's figure (the robustness panel of a finished study) as a PNG.

    .venv/bin/python tools/readme_figure.py reports/smollm2-135m docs/assets/report-robustness.png

The figure is the report's own (``plots.robustness`` with the study's stage bands), rendered by a
headless Chromium (Debian's ``chromium`` package) from a one-figure HTML page
(``tools/figure_shot.py``'s ``render_png``), so no static exporter (kaleido) is needed.
"""

from __future__ import annotations

import sys

from figure_shot import render_png  # tools/ is on the path when this script runs

from stages_of_inference import plots
from stages_of_inference.study import load_study

WIDTH, HEIGHT = 1200, 760


def main(study_dir: str, out_png: str) -> None:
    """Draw the README's robustness figure from a finished study into ``out_png``."""
    study = load_study(study_dir)
    sweeps = [done["robustness"] for done in study.results.values() if "robustness" in done]
    if not sweeps:
        raise SystemExit(f"{study_dir} holds no finished robustness analysis")
    stages = [t for t in study.stages.values() if not t.empty] or None
    fig = plots.robustness(sweeps, stages=stages)
    render_png(fig, out_png, WIDTH, HEIGHT)

if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
