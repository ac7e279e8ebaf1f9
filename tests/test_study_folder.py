"""The study owns its folder and nothing else, from the command line: a folder with other work in
it is refused unless adopted, a user's file where the study writes is refused by name, the lock
is never followed through a link and is gone after a run, no work folder outlives a run; the
folder names of models round-trip through ``load_study``; ``merge`` checks the whole study.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from stages_of_inference import cli
from stages_of_inference.study import load_study, run_study
from stages_of_inference.study.config import StudyConfig
from stages_of_inference.study.folder import StudyFolder, slug
from stages_of_inference.study.sharded import MergeError, merge_studies, run_shard
from tests.test_distributed import needs_ray, tiny_folder
from tests.test_report import _tiny

USER_FILES = {".notes.tmp": b"my notes", "project/.draft.v2.tmp": b"a draft", "photos/.import.batch.tmp/photo.jpg":
              b"\xff\xd8 a photo", "tasks/mine.txt": b"my own task list", "notes.md": b"# notes"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama saved as a transformers folder (loads by its path, offline)."""
    return tiny_folder(tmp_path_factory.mktemp("models") / "tiny-a", 0)


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temporary folder of this test, to see whether a run leaves anything there."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _flags(model: str, corpus: Path, *more: str) -> list[str]:
    return ["--model", model, "--corpus", str(corpus), "--n-tokens", "32", "--seq-len", "16", "--analyses", "neurons",
            "--no-static", "--quiet", *more]


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def _user_files(folder: Path) -> None:
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def _assert_user_files_intact(folder: Path) -> None:
    for name, data in USER_FILES.items():
        assert (folder / name).read_bytes() == data, name


def test_a_folder_with_other_work_is_refused_unless_adopted_and_then_left_alone(
        tiny: str, corpus: Path, tmp_path: Path, private_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "work"
    _user_files(out)
    before = _snapshot(out)
    code, err = _cli(["run", *_flags(tiny, corpus), "--out-dir", str(out)], capsys)
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1, err
    assert "is not empty" in err and "not a study folder" in err and "--adopt-folder" in err
    assert _snapshot(out) == before, "a refused run touches nothing"

    code, err = _cli(["run", *_flags(tiny, corpus), "--out-dir", str(out), "--adopt-folder"], capsys)
    assert code == cli.EXIT_OK, err
    _assert_user_files_intact(out)
    assert (out / "report.html").is_file() and (out / "study.json").is_file()
    assert (out / slug(tiny) / "neurons" / "provenance.json").is_file()
    private = StudyFolder(out).private
    assert sorted(p.name for p in private.iterdir()) == ["folder.json"], "no lock, temporaries, work or tasks left"
    assert not list(private_tmp.iterdir()), "nothing left in the system's temporary folder"
    # now a study folder: a second run needs no adoption and reuses the result
    code, err = _cli(["run", *_flags(tiny, corpus), "--out-dir", str(out)], capsys)
    assert code == cli.EXIT_OK, err
    _assert_user_files_intact(out)


@pytest.mark.parametrize("in_the_way", ["model folder", "figures folder", "report", "study file", "model folder is a file"])
def test_a_users_file_where_an_adopted_study_writes_is_refused_by_name(
        in_the_way: str, tiny: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "adopted"
    path = {"model folder": out / slug(tiny) / "neurons" / "photo.jpg", "figures folder": out / "figures" / "a.png",
            "report": out / "report.html", "study file": out / "study.json",
            "model folder is a file": out / slug(tiny)}[in_the_way]
    path.parent.mkdir(parents=True)
    path.write_bytes(b"<html>my own page</html>" if in_the_way == "report" else b"mine")
    before = _snapshot(out)
    code, err = _cli(["run", *_flags(tiny, corpus), "--out-dir", str(out), "--adopt-folder"], capsys)
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1, err
    named = {"model folder": out / slug(tiny), "figures folder": out / "figures"}.get(in_the_way, path)
    assert f"{named} is in the way" in err, err
    assert _snapshot(out) == before


@pytest.mark.parametrize("in_the_way", ["result folder holds a photo", "report replaced", "study.json replaced"])
def test_a_users_file_put_into_a_study_folder_is_never_replaced(
        in_the_way: str, tiny: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    assert cli.main(["run", *_flags(tiny, corpus), "--out-dir", str(out)]) == cli.EXIT_OK
    result = out / slug(tiny) / "neurons"
    if in_the_way == "result folder holds a photo":
        (result / "photo.jpg").write_bytes(b"mine")
        named = result
    elif in_the_way == "report replaced":
        (out / "report.html").write_text("<html>my own page</html>")
        named = out / "report.html"
    else:  # the private folder still marks the folder as a study's
        (out / "study.json").write_text("my notes")
        named = out / "study.json"
    before = _snapshot(out)
    code, err = _cli(["run", *_flags(tiny, corpus, "--seed", "1"), "--out-dir", str(out)], capsys)
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1, err
    assert f"{named} is in the way" in err, err
    assert _snapshot(out) == before


@pytest.mark.parametrize("lock", ["symlink", "folder"])
def test_the_lock_is_never_followed_through_a_link_nor_a_folder(
        lock: str, tiny: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    victim = tmp_path / "precious.txt"
    victim.write_text("do not overwrite")
    StudyFolder(out).private.mkdir(parents=True)
    if lock == "symlink":
        StudyFolder(out).lock.symlink_to(victim)
    else:
        StudyFolder(out).lock.mkdir()
    code, err = _cli(["run", *_flags(tiny, corpus), "--out-dir", str(out)], capsys)
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1, err
    assert ("a symbolic link" if lock == "symlink" else "a folder") in err and "lock file" in err
    assert victim.read_text() == "do not overwrite"
    assert not (out / "study.json").exists()


def test_a_shard_run_leaves_its_task_results_and_no_work_folder(
        tiny: str, corpus: Path, tmp_path: Path, private_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "shard"
    code, err = _cli(["run", *_flags(tiny, corpus, "--analyses", "neurons,robustness", "--batch-size", "1"),
                      "--shard", "1/2", "--out-dir", str(out)], capsys)
    assert code == cli.EXIT_OK, err
    folder = StudyFolder(out)
    assert sorted(p.name for p in folder.private.iterdir()) == ["folder.json", "tasks"]
    assert (out / "shard-1-of-2.json").is_file() and not list(private_tmp.iterdir())
    assert not (out / ".work").exists()


def test_merge_refuses_shards_made_from_other_weights(tmp_path: Path, corpus: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Shards holding different analyses (the sweep's halves, the lens in one, the neurons in the
    other) made from two models of one name: merge names the shards and the two weights hashes."""
    config = StudyConfig(models=("m",), corpus=str(corpus), n_tokens=64, seq_len=16, batch_size=2,
                         analyses=("robustness", "logit_lens", "neurons"), static_formats=())
    one, other = _tiny("m", "llama", seed=0), _tiny("m", "llama", seed=5)
    run_shard(config, 0, 2, tmp_path / "s1", loaded={"m": one}, log=None)
    run_shard(config, 1, 2, tmp_path / "s2", loaded={"m": other}, log=None)
    with pytest.raises(MergeError, match=r"m: shard 1 of 2 .* and shard 2 of 2 .* were made from different models or "
                                         r"text \(model_weights_hash \w+ against \w+\)"):
        merge_studies([tmp_path / "s1", tmp_path / "s2"], tmp_path / "merged", log=None)
    code, err = _cli(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out-dir", str(tmp_path / "m2")], capsys)
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1 and "model_weights_hash" in err, err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "m2").exists()
    # the same shard folders, each made from the one model: merged
    run_shard(config, 1, 2, tmp_path / "s3", loaded={"m": one}, log=None)
    merged = merge_studies([tmp_path / "s1", tmp_path / "s3"], tmp_path / "merged", log=None, write_report=False)
    hashes = {r.provenance["study_fingerprint"]["model_weights_hash"] for r in merged.results["m"].values()}
    assert len(hashes) == 1


def test_two_models_with_one_basename_round_trip_through_load_study(tmp_path: Path, corpus: Path) -> None:
    a, b = _tiny("runA/ckpt", "llama", seed=0), _tiny("runB/ckpt", "llama", seed=3)
    config = StudyConfig(models=("runA/ckpt", "runB/ckpt"), corpus=str(corpus), n_tokens=32, seq_len=16,
                         analyses=("neurons", "robustness"), static_formats=())
    study = run_study([a, b], config=config, out_dir=tmp_path / "s", progress=False, log=None, write_report=False)
    assert {p.name for p in (tmp_path / "s").iterdir() if not p.name.startswith(".")} == {"ckpt", "ckpt_", "study.json"}
    back = load_study(tmp_path / "s")
    for name in ("runA/ckpt", "runB/ckpt"):
        for analysis, result in study.results[name].items():
            for key, table in result.tables.items():
                pd.testing.assert_frame_equal(back.results[name][analysis][key], table, check_exact=True,
                                              obj=f"{name} {analysis} {key}")
            assert back.results[name][analysis].provenance["model"]["name"] == name
    moments = [back.results[n]["neurons"]["moments"]["vocab_kurt"] for n in ("runA/ckpt", "runB/ckpt")]
    assert not moments[0].equals(moments[1]), "each model's own tables"


@needs_ray
def test_a_ray_run_leaves_a_users_tasks_folder_alone(tiny: str, corpus: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "work"
    _user_files(out)
    code, err = _cli(["run", *_flags(tiny, corpus, "--ray", "--workers", "1"), "--out-dir", str(out), "--adopt-folder"],
                     capsys)
    assert code == cli.EXIT_OK, err
    _assert_user_files_intact(out)
    assert sorted(p.name for p in StudyFolder(out).private.iterdir()) == ["folder.json"]
    assert json.loads((out / "study.json").read_text())["analyses"] == ["neurons"]


def test_a_study_interrupted_mid_sweep_resumes_from_its_checkpoints(tmp_path: Path, corpus: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed (here: interrupted) after the sweep's first batch, a study keeps that batch's
    checkpoint in its private work folder; the next run computes only the other batches and ends
    with a clean run's numbers, bit for bit; then no work folder is left."""
    from stages_of_inference.interventions import checkpoint

    model = _tiny("tiny-llama", "llama")
    config = StudyConfig(models=("tiny-llama",), corpus=str(corpus), n_tokens=64, seq_len=16, batch_size=1,
                         analyses=("robustness",), static_formats=())
    clean = run_study(model, config=config, out_dir=tmp_path / "clean", progress=False, log=None, write_report=False)
    saved: list[int] = []
    real_save = checkpoint.SweepCheckpoint.save

    def save_then_stop(self, batch):  # noqa: ANN001, ANN202
        real_save(self, batch)
        saved.append(batch.index)
        if len(saved) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.SweepCheckpoint, "save", save_then_stop)
    out = tmp_path / "study"
    with pytest.raises(KeyboardInterrupt):
        run_study(model, config=config, out_dir=out, progress=False, log=None, write_report=False)
    assert list(StudyFolder(out).work.iterdir()), "the interrupted sweep's checkpoint is kept"
    again = run_study(model, config=config, out_dir=out, progress=False, log=None, write_report=False)
    assert saved == [0, 1, 2, 3], "the rerun computed only the batches the first run had not finished"
    for key, table in clean.results["tiny-llama"]["robustness"].tables.items():
        pd.testing.assert_frame_equal(again.results["tiny-llama"]["robustness"][key], table, check_exact=True)
    assert not StudyFolder(out).work.exists()
