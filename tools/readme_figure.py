"""Draw the README's figure (the robustness panel of a finished study) as a PNG.

    .venv/bin/python tools/readme_figure.py reports/smollm2-135m docs/assets/report-robustness.png

The figure is the report's own (``plots.robustness`` with the study's stage bands), rendered by a
headless Chromium (Debian's ``chromium`` package) from a one-figure HTML page, so no static
exporter (kaleido) is needed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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
    fig.update_layout(width=WIDTH, height=HEIGHT)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "figure.html"
        fig.write_html(page, include_plotlyjs=True, full_html=True, config={"displayModeBar": False})
        shot = Path(tmp) / "figure.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=10000",
                        f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=300)
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, out_png)
    print(f"wrote {out_png}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
