"""The documentation builds with warnings as errors; the citation file cites the paper."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _nav_pages(nav: list) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


def _load_mkdocs_yml() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def test_nav_covers_the_required_pages() -> None:
    pages = _nav_pages(_load_mkdocs_yml()["nav"])
    for page in ("index.md", "installation.md", "offline-models.md", "report.md", "analyses.md", "stage-bands.md",
                 "decisions.md", "benchmarks.md", "engine.md", "lens.md", "cite.md", "notebooks.md",
                 "stages/detokenization.md", "stages/feature_engineering.md", "stages/prediction_ensembling.md",
                 "stages/residual_sharpening.md", "api/plots.md", "api/report.md"):
        assert page in pages, f"{page} is not in the nav"


def test_docs_build_strict(tmp_path: Path) -> None:
    import mkdocs  # noqa: F401  (the dev extra installs both: a missing one is a failure, not a skip)
    import mkdocstrings_handlers.python  # noqa: F401
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "index.html").exists() and (site / "stage-bands" / "index.html").exists()
    api = (site / "api" / "plots" / "index.html").read_text()
    assert "place_stages" in api and "robustness_table" in api  # the API reference comes from the docstrings


def test_citation_file_cites_the_paper() -> None:
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"].startswith("1.2") and cff["type"] == "software"
    paper = cff["preferred-citation"]
    assert "Stages of Inference" in paper["title"]
    assert [a["family-names"] for a in paper["authors"]] == ["Lad", "Lee", "Gurnee", "Tegmark"]
    assert "2406.19384" in str(paper)
    assert any("2406.19384" in str(ref) for ref in cff["references"])


def test_readme_says_where_the_report_lands_and_shows_a_figure() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "report.html" in readme
    figures = [line for line in readme.splitlines() if line.startswith("![")]
    assert figures, "the README shows no figure"
    path = figures[0].split("(", 1)[1].rstrip(")")
    assert (ROOT / path).exists(), path
