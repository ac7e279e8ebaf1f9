"""The study: every analysis, resumable, atomic, and a self-contained report."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from stages_of_inference.batch import token_digest
from stages_of_inference.results import Result
from stages_of_inference.study import (
    REGISTRY,
    Analysis,
    StudyConfig,
    StudyMismatchError,
    build_report,
    load_study,
    run_study,
)
from stages_of_inference.study.folder import StudyFolder
from tests.conftest import make_tiny_model

TINY_ANALYSES = ("robustness", "previous_token_attention", "logit_lens", "layer_similarity", "neurons", "sharpening",
                 "repetition", "sublayers", "sinks", "contiguous_deletions", "competing_readings", "tuned_lens",
                 "guess_then_refine")


def _tiny(name: str, family: str, seed: int = 0):  # noqa: ANN202 - a HookedTransformer with a word-level tokenizer
    model = make_tiny_model(family, seed)
    words = ["<bos>", "<unk>"] + [f"w{i}" for i in range(model.cfg.d_vocab - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")
    model.cfg.model_name = name
    return model


def _config(corpus: Path, names: tuple[str, ...], **kw) -> StudyConfig:  # noqa: ANN003
    return StudyConfig(**{"models": names, "corpus": str(corpus), "n_tokens": 64, "seq_len": 16,
                          "analyses": TINY_ANALYSES, "static_formats": (), "tuned_lens_steps": 3, **kw})


def test_study_config_validates_and_round_trips() -> None:
    c = StudyConfig(models=("a", "b"), n_tokens=2048, analyses="robustness")
    assert c.analyses == ("robustness",) and c.n_sequences == 16 and c.heavy_sequences == 8
    assert StudyConfig.from_json(c.to_json()) == c
    for bad, match in ((dict(models=()), "models is empty"), (dict(models=("a", "a")), "twice"),
                       (dict(analyses=("nope",)), "unknown analyses"), (dict(n_tokens=100), "n_tokens"),
                       (dict(table_format="xlsx"), "table_format"), (dict(static_formats=("gif",)), "static")):
        with pytest.raises(ValueError, match=match):
            StudyConfig(**bad)
    with pytest.raises(ValueError, match="unknown study settings"):
        StudyConfig.from_json('{"bogus": 1}')


def test_two_models_study_report_and_data_files(tmp_path: Path, corpus: Path) -> None:
    deep, shallow = _tiny("tiny-llama", "llama"), _tiny("tiny-gpt2", "gpt2")
    shallow_cut = shallow  # 4 blocks each; relative depth still puts both on [0, 1]
    config = _config(corpus, ("tiny-llama", "tiny-gpt2"))
    study = run_study([deep, shallow_cut], config=config, out_dir=tmp_path / "study", progress=False, log=None)
    out = tmp_path / "study"
    assert study.report == out / "report.html" and study.report.exists()
    # one folder per model and analysis, each a saved Result with provenance and the study fingerprint
    for slug in ("tiny-llama", "tiny-gpt2"):
        for analysis in TINY_ANALYSES:
            folder = out / slug / analysis
            saved = Result.load(folder)
            assert saved.provenance["study_fingerprint"]["analysis"] == analysis
            assert all((folder / f"{t}.parquet.json").exists() for t in saved.tables)
    # every table records the model, and the corpus and seed of the tokens it read, explicitly
    for sidecar in out.rglob("*.parquet.json"):
        record = json.loads(sidecar.read_text())
        analysis = sidecar.parent.name
        assert record["model"]["name"] == sidecar.parent.parent.name, sidecar
        assert record["study"]["corpus"] == str(corpus) and record["study"]["seed"] == 0, sidecar
        if REGISTRY[analysis].tokens != "none":
            tokens = record["tokens"]
            assert (tokens["corpus"], tokens["seed"]) == (str(corpus), 0), sidecar
            assert tokens["sha256"] == record["study_fingerprint"]["tokens_sha256"], sidecar
            assert tokens["corpus_sha256"], sidecar  # a file corpus: the digest of its text
    assert not list(out.rglob(".*.work"))  # the sweep's checkpoint folder is gone once its result is saved
    assert json.loads((out / "study.json").read_text())["models"] == ["tiny-llama", "tiny-gpt2"]
    assert not list(out.rglob("*.tmp"))  # nothing half-written left behind

    page = study.report.read_text()
    assert page.count("<script type=\"text/javascript\">") == 1  # plotly.js embedded once
    assert "<script src" not in page and "<link" not in page  # self-contained: nothing loaded from elsewhere
    assert page.count("Plotly.newPlot") == len(study.figures) == 16
    for name in ("robustness", "layer_effects", "previous_token_attention", "logit_lens", "prediction_depth",
                 "layer_similarity", "neuron_counts", "sharpening", "repetition", "sublayer_deletion", "sink_profile",
                 "contiguous_deletions", "competing_readings", "tuned_lens", "guess_then_refine_1",
                 "guess_then_refine_2"):
        assert f"id='{name}'" in page
        assert study.readings[name].strip(), f"no reading for {name}"
    assert "tiny-llama" in page and "tiny-gpt2" in page and "Provenance" in page and "Settings" in page
    assert "The same boundaries, by the signals beyond the paper" in page and "sink heads take over" in page
    assert "MLP damage overtakes attention damage" in page
    # every stage boundary the rule places, and the resampled signals, carry a bootstrap interval
    for name in ("tiny-llama", "tiny-gpt2"):
        stages = study.stages[name]
        assert (stages["first_layer_low"] <= stages["first_layer"]).all() and (stages["first_layer"] <= stages["first_layer_high"]).all()
        assert set(stages.attrs["intervals"]["boundary"]) >= {"rule: residual sharpening", "half the predictions have settled",
                                                              "compression begins (the first token's norm jumps)"}
    assert "90 % interval" in page and "overlapping 90 % bootstrap intervals" in page
    assert "compression begins" in page and "Rank correlation with the KL of deleting each block" in page
    runs = study.results["tiny-gpt2"]["contiguous_deletions"]["runs"]
    assert runs[["k", "start"]].values.tolist() == [[1, 0], [1, 1], [1, 2], [1, 3], [2, 0], [2, 1], [2, 2]]
    # the sublayer figure draws both models' sublayer deletions and their block deletions on the same sequences
    names = {t.name for t in study.figures["sublayer_deletion"].data if t.name and "±" not in t.name}
    assert {f"{m}: {k}" for m in ("tiny-llama", "tiny-gpt2")
            for k in ("delete attention only", "delete MLP only", "delete block")} <= names
    heavy = config.heavy_sequences
    blocks = study.results["tiny-gpt2"]["sublayers"]["blocks"]
    assert (blocks["n_tokens"] == heavy * (config.seq_len - 2)).all()
    assert "Not drawn" not in page
    # both models overlaid in one figure, one colour each
    names = {t.name for t in study.figures["robustness"].data if t.name and "±" not in t.name}
    assert {"tiny-llama: delete block", "tiny-gpt2: delete block"} <= names
    assert set(study.stages) == {"tiny-llama", "tiny-gpt2"}
    # a model with no prediction or suppression neuron says so, with its highest kurtosis
    none_found = 0
    for name in ("tiny-llama", "tiny-gpt2"):
        moments = study.results[name]["neurons"]["moments"]
        reading = re.search(rf"<b>{name}</b>:[^<]*", study.readings["neuron_counts"]).group(0)
        if (moments["kind"] == "other").all():
            top = moments["vocab_kurt"].max()
            assert "no neuron passes the kurtosis threshold" in reading and f"{top:.1f}" in reading
            none_found += 1
        else:
            assert "prediction and" in reading
    assert none_found, "random tiny models were expected to hold no prediction or suppression neuron"
    assert "unknown" not in json.dumps(study.results["tiny-gpt2"]["robustness"].provenance["versions"])

    # reading it back gives the same figures
    again = load_study(out)
    assert set(again.results["tiny-gpt2"]) == set(TINY_ANALYSES)
    assert build_report(again) == study.report


def test_interrupted_study_resumes_and_mismatch_is_handled(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    model = _tiny("tiny-parallel", "parallel")
    config = _config(corpus, ("tiny-parallel",))
    calls: list[str] = []

    def counted(entry: Analysis, fail: bool = False) -> Analysis:
        def compute(ctx):  # noqa: ANN001, ANN202
            calls.append(entry.name)
            if fail:
                raise KeyboardInterrupt
            return entry.compute(ctx)
        return dataclasses.replace(entry, compute=compute)

    originals = dict(REGISTRY)
    for name, entry in originals.items():
        monkeypatch.setitem(REGISTRY, name, counted(entry, fail=name == "layer_similarity"))
    with pytest.raises(KeyboardInterrupt):
        run_study(model, config=config, out_dir=tmp_path, progress=False, log=None)
    assert calls == ["robustness", "previous_token_attention", "logit_lens", "layer_similarity"]
    assert not (tmp_path / "report.html").exists()

    calls.clear()
    for name, entry in originals.items():
        monkeypatch.setitem(REGISTRY, name, counted(entry))
    study = run_study(model, config=config, out_dir=tmp_path, progress=False, log=None, write_report=False)
    assert [a for _, a in study.reused] == ["robustness", "previous_token_attention", "logit_lens"]

    # other settings: refused on request, recomputed by default
    other = _config(corpus, ("tiny-parallel",), seed=1)
    with pytest.raises(StudyMismatchError, match="other settings"):
        run_study(model, config=other, out_dir=tmp_path, progress=False, log=None, on_mismatch="error")
    study = run_study(model, config=other, out_dir=tmp_path, progress=False, log=None, write_report=False)
    assert ("tiny-parallel", "neurons") in study.reused  # the weights-only analysis does not depend on the text
    assert ("tiny-parallel", "robustness") not in study.reused
    fp = Result.load(tmp_path / "tiny-parallel" / "robustness").provenance["study_fingerprint"]
    assert fp["tokens_sha256"] == token_digest(
        __import__("stages_of_inference").load_tokens(model, str(corpus), n_sequences=4, seq_len=16, seed=1))


def test_static_figures_only_when_an_exporter_is_installed(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_kaleido(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if name == "kaleido":
            raise ImportError("no kaleido here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kaleido)
    model = _tiny("tiny-static", "gpt2")
    config = StudyConfig(models=("tiny-static",), corpus=str(corpus), n_tokens=32, seq_len=16,
                         analyses=("previous_token_attention",))
    study = run_study(model, config=config, out_dir=tmp_path, progress=False, log=None)
    assert "install kaleido" in study.static_note and not (tmp_path / "figures").exists()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_mismatch"):
        run_study("smollm2-135m", out_dir=tmp_path, on_mismatch="ignore")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        run_study("smollm2-135m", out_dir=tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="no study"):
        load_study(tmp_path)


@pytest.mark.real
def test_real_model_small_study(real_model, tmp_path: Path) -> None:
    """The embedded model on a few hundred tokens: the cheap analyses, the stages, the report."""
    config = StudyConfig(models=("smollm2-135m",), n_tokens=256, seq_len=64,
                         analyses=("robustness", "previous_token_attention", "logit_lens"), static_formats=())
    study = run_study(real_model, config=config, out_dir=tmp_path, progress=False, log=None)
    summary = study.results["smollm2-135m"]["robustness"]["summary"]
    drops = summary[summary["kind"] == "drop"]
    assert int(drops.loc[drops["kl_nats"].idxmax(), "layer"]) == 0  # block 0 is the fragile one
    stages = study.stages["smollm2-135m"]
    assert stages["first_layer"].tolist()[0] == 0 and stages["last_layer"].tolist()[-1] == 29
    assert 0.3 < float(stages.loc[stages["stage"] == "prediction ensembling", "start"].iloc[0]) < 0.8
    page = study.report.read_text()
    assert re.search(r"Deleting block 0 \(relative depth 0\.00\) does the most damage", page)
    assert len(page) > 3_000_000  # plotly.js is inside
    # a second run reuses everything
    again = run_study(real_model, config=config, out_dir=tmp_path, progress=False, log=None, write_report=False)
    assert len(again.reused) == 3 and isinstance(again.results["smollm2-135m"]["logit_lens"]["lens"], pd.DataFrame)


# ------------------------------------------------------------------------------------------- damage
def _study_numbers(study) -> dict[str, pd.DataFrame]:  # noqa: ANN001
    return {f"{a}/{k}": t for a, r in study.results["tiny-gpt2"].items() for k, t in r.tables.items()}


@pytest.mark.parametrize("damage", ["broken sidecar", "truncated table", "altered table", "deleted table",
                                    "broken provenance", "stale temporary"])
def test_a_damaged_study_folder_is_named_and_recomputed(damage: str, tmp_path: Path, corpus: Path) -> None:
    """Each kind of damage to a finished study folder: the rerun names the damaged file in one line,
    recomputes that result, and ends with the numbers of a clean run."""
    model = _tiny("tiny-gpt2", "gpt2")
    config = _config(corpus, ("tiny-gpt2",), analyses=("robustness", "logit_lens"))
    clean = run_study(model, config=config, out_dir=tmp_path / "clean", progress=False, log=None, write_report=False)
    out = tmp_path / "damaged"
    run_study(model, config=config, out_dir=out, progress=False, log=None, write_report=False)
    folder = out / "tiny-gpt2"
    target = {"broken sidecar": folder / "robustness" / "summary.parquet.json",
              "truncated table": folder / "logit_lens" / "lens.parquet",
              "altered table": folder / "robustness" / "summary.parquet",
              "deleted table": folder / "robustness" / "summary.parquet",
              "broken provenance": folder / "logit_lens" / "provenance.json",
              "stale temporary": StudyFolder(out).tmp / ".robustness.abc123.tmp"}[damage]
    if damage == "broken sidecar" or damage == "broken provenance":
        target.write_text('{"model": {name: broken')
    elif damage == "truncated table":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "altered table":
        table = pd.read_parquet(target)
        table["kl_nats"] *= 10
        table.to_parquet(target, index=False)
    elif damage == "deleted table":
        target.unlink()
    else:  # what a run killed while saving the robustness result leaves behind
        target.mkdir(parents=True)
        (target / "half-written.parquet").write_bytes(b"PAR1")
        beside = folder / ".robustness.abc123.tmp"  # the same name outside the study's private folder: a user's
        beside.mkdir()
    lines: list[str] = []
    again = run_study(model, config=config, out_dir=out, progress=False, log=lines.append, write_report=False)
    said = "\n".join(lines)
    assert str(target) in said, said
    assert not target.exists() if damage == "stale temporary" else target.exists()
    if damage == "stale temporary":
        assert (folder / ".robustness.abc123.tmp").is_dir(), "a file the study did not write is never removed"
    damaged_analysis = target.parent.name if damage != "stale temporary" else None
    assert [a for _, a in again.reused] == [a for a in ("robustness", "logit_lens") if a != damaged_analysis]
    for key, table in _study_numbers(clean).items():
        pd.testing.assert_frame_equal(_study_numbers(again)[key], table, check_exact=True, obj=key)


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path: Path, corpus: Path) -> None:
    from stages_of_inference._utils import LockedError, file_lock

    model = _tiny("tiny-gpt2", "gpt2")
    config = _config(corpus, ("tiny-gpt2",), analyses=("neurons",))
    out = tmp_path / "study"
    out.mkdir()
    held = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from stages_of_inference._utils import file_lock\n"
        f"with file_lock({str(StudyFolder(out).lock)!r}):\n    print('held', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert held.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=r"the study folder .* is in use by process \d+"):
            run_study(model, config=config, out_dir=out, progress=False, log=None)
        assert not (out / "tiny-gpt2").exists() and not (out / "study.json").exists()
    finally:
        held.kill()
        held.wait(timeout=10)
    with file_lock(StudyFolder(out).lock):  # released when its holder died
        pass
    assert run_study(model, config=config, out_dir=out, progress=False, log=None, write_report=False).results


def test_a_refused_run_changes_nothing_on_disk(tmp_path: Path, corpus: Path) -> None:
    model = _tiny("tiny-gpt2", "gpt2")
    out = tmp_path / "study"
    run_study(model, config=_config(corpus, ("tiny-gpt2",), analyses=("robustness",)), out_dir=out, progress=False,
              log=None, write_report=False)
    def files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = files()
    with pytest.raises(StudyMismatchError):
        run_study(model, config=_config(corpus, ("tiny-gpt2",), analyses=("robustness",), seed=3), out_dir=out,
                  progress=False, log=None, on_mismatch="error")
    assert files() == before


def test_the_lenses_train_outside_the_batch_and_the_jacobian_lens_is_opt_in(tmp_path: Path, corpus: Path) -> None:
    from stages_of_inference.study.analyses import TUNED_LENS_SEQUENCES, training_split
    from stages_of_inference.study.registry import default_analyses

    assert "tuned_lens" in default_analyses() and "jacobian_lens" not in default_analyses()
    model = _tiny("tiny-llama", "llama")
    config = _config(corpus, ("tiny-llama",), analyses=("robustness", "logit_lens", "tuned_lens", "jacobian_lens"),
                     jacobian_lens_prompts=2)
    from stages_of_inference.data import load_token_batch

    batch = load_token_batch(model, str(corpus), config.n_sequences, config.seq_len, config.seed)
    split = training_split(model, config, batch)
    assert split.tokens.shape == (TUNED_LENS_SEQUENCES, config.seq_len)
    held = {tuple(r) for r in batch.tokens.tolist()}
    assert not held & {tuple(r) for r in split.tokens.tolist()}
    study = run_study([model], config=config, out_dir=tmp_path / "study", progress=False, log=None)
    done = study.results["tiny-llama"]
    assert set(done["tuned_lens"]["lens"]["convention"]) == {"tuned"}
    assert set(done["jacobian_lens"]["lens"]["convention"]) == {"jacobian"}
    stages = study.stages["tiny-llama"]
    assert set(stages.attrs["by_lens"]) == {"paper", "per_layer_norm", "tuned", "jacobian"}
    intervals = stages.attrs["by_lens_intervals"]
    assert set(intervals) == {"paper", "per_layer_norm", "tuned", "jacobian"}
    assert all(low <= high for lens in intervals.values() for low, high in lens.values())
    # the paper lens's intervals here are the stage table's own (the same resamples)
    table = stages.set_index("stage")
    for stage, (low, high) in intervals["paper"].items():
        assert (low, high) == (table.loc[stage, "first_layer_low"], table.loc[stage, "first_layer_high"])
    assert "Jacobian lens" in study.readings["tuned_lens"] and "tuned lens" in study.readings["tuned_lens"]
    assert list(study.figures).count("tuned_lens") == 1
    with pytest.raises(ValueError, match="jacobian_lens_prompts must be 1 .. 32"):
        _config(corpus, ("tiny-llama",), jacobian_lens_prompts=33)


def test_the_placement_line_says_where_each_lens_would_place_the_stages_with_intervals() -> None:
    from stages_of_inference.study.readings import _lens_moves

    table = pd.DataFrame({"stage": ["detokenization", "feature engineering", "prediction ensembling",
                                    "residual sharpening"], "first_layer": [0, 3, 14, 27], "lens_convention": "paper"})
    table.attrs["by_lens"] = {"paper": [0, 3, 14, 27], "per_layer_norm": [0, 3, 14, 27], "tuned": [0, 3, -1, 26]}
    table.attrs["by_lens_intervals"] = {"tuned": {"prediction ensembling": (-1, -1), "residual sharpening": (25, 27)}}
    line = _lens_moves(table)
    assert "with the tuned lens prediction ensembling would get no block (no block in 90 % of resamples; here: " \
           "block 14), residual sharpening would start at block 26 (90 % interval 25–27; here: block 27)" in line
    assert "per_layer_norm" not in line  # a lens that places the stages alike is not named
