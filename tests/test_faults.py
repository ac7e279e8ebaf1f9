"""Faults a careless or hostile user meets, third round (docs/reliability.md lists the catalogue):
full and read-only disks, records of a study folder or a shard that were edited or replaced by
special files, corpus folders holding pipes, wrong types at the API, and late or misleading
messages. Each ends within a minute with one line and the documented exit code, or gives the
numbers of a clean run."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import stages_of_inference as soi
from stages_of_inference import cli
from stages_of_inference.results import Result
from stages_of_inference.study import StudyConfig, load_study, run_study
from stages_of_inference.study.sharded import MergeError, merge_studies, run_shard
from tests.test_distributed import tiny_folder
from tests.test_report import _tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_folder(tmp_path_factory.mktemp("models") / "tiny-f", 0)


def _flags(model: str, corpus: Path, *more: str) -> list[str]:
    return ["--model", model, "--corpus", str(corpus), "--n-tokens", "32", "--seq-len", "16", "--no-static", "--quiet",
            *more]


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(args)
    return code, capsys.readouterr().err.strip()


def _process(args: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    """The command in a fresh process, bounded in time (a case that would hang fails here)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "stages_of_inference.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------ full disks
@contextlib.contextmanager
def _small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``where`` (needs root and a kernel that lets this process mount)."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:100]}); the simulated full disk below "
                    "runs everywhere")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_is_one_line_exit_6_and_the_rerun_after_freeing_space_completes(
        tiny: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = tmp_path / "clean"
    assert cli.main(["run", *_flags(tiny, corpus, "--analyses", "neurons"), "--out-dir", str(clean)]) == 0
    with _small_filesystem(tmp_path / "small", "1m") as disk:  # the report (plotly inside) needs more than 3 MB
        out = disk / "study"
        code, err = _cli(["run", *_flags(tiny, corpus, "--analyses", "neurons"), "--out-dir", str(out)], capsys)
        assert code == cli.EXIT_WRITE, err
        line = _one_line(err)
        assert f"{out / 'report.html'} could not be written: No space left on device" in line
        assert not _temporaries(disk) and not (out / "report.html").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        code, err = _cli(["run", *_flags(tiny, corpus, "--analyses", "neurons"), "--out-dir", str(out)], capsys)
        assert code == cli.EXIT_OK, err
        again, first = load_study(out), load_study(clean)
        name = next(iter(first.results))
        for key, table in first.results[name]["neurons"].tables.items():
            pd.testing.assert_frame_equal(again.results[name]["neurons"][key], table, check_exact=True)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_write_failing_mid_run_is_one_line_and_leaves_nothing_half_written(
        code: int, tiny: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated where no tmpfs can be mounted (and for a read-only folder): the second table the
    study writes fails with the system's error; the run ends in one line naming the file (exit 6),
    nothing half-written stays, and the rerun gives a clean run's numbers."""
    flags = _flags(tiny, corpus, "--analyses", "neurons,robustness")
    clean = tmp_path / "clean"
    assert cli.main(["run", *flags, "--out-dir", str(clean)]) == 0
    real = pd.DataFrame.to_parquet
    calls: list[int] = []

    def failing(self, path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 2:
            raise OSError(code, os.strerror(code))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", failing)
    out = tmp_path / "study"
    status, err = _cli(["run", *flags, "--out-dir", str(out)], capsys)
    assert status == cli.EXIT_WRITE, err
    assert f"could not be written: {os.strerror(code)}" in _one_line(err) and str(out) in err
    assert not _temporaries(out)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    assert cli.main(["run", *flags, "--out-dir", str(out)]) == 0
    first, again = load_study(clean), load_study(out)
    name = next(iter(first.results))
    for analysis, result in first.results[name].items():
        for key, table in result.tables.items():
            pd.testing.assert_frame_equal(again.results[name][analysis][key], table, check_exact=True, obj=key)


# ------------------------------------------------------------------------------------ records as untrusted input
def _finished(tmp_path: Path, corpus: Path) -> tuple[Path, StudyConfig, object]:
    model = _tiny("tiny-gpt2", "gpt2")
    config = StudyConfig(models=("tiny-gpt2",), corpus=str(corpus), n_tokens=32, seq_len=16, analyses=("neurons",),
                         static_formats=())
    out = tmp_path / "study"
    run_study(model, config=config, out_dir=out, progress=False, log=None, write_report=False)
    return out, config, model


@pytest.mark.parametrize("files", ["a list", "/etc/hostname", "../../outside.txt", "a fifo"])
def test_an_edited_provenance_record_is_named_and_recomputed_and_nothing_outside_is_read(
        files: str, tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, config, model = _finished(tmp_path, corpus)
    meta = out / "tiny-gpt2" / "neurons" / "provenance.json"
    (tmp_path / "outside.txt").write_text("not the study's")
    if files == "a fifo":
        meta.unlink()
        os.mkfifo(meta)
    else:
        record = json.loads(meta.read_text())
        record["files"] = ["counts.parquet"] if files == "a list" else {files: "0" * 64}
        meta.write_text(json.dumps(record))
    opened: list[Path] = []
    from stages_of_inference import results

    real = results.file_sha256
    monkeypatch.setattr(results, "file_sha256", lambda p: opened.append(Path(p)) or real(p))
    lines: list[str] = []
    again = run_study(model, config=config, out_dir=out, progress=False, log=lines.append, write_report=False)
    assert any(str(meta) in line and "recomputing it" in line for line in lines), lines
    assert ("tiny-gpt2", "neurons") not in again.reused
    assert all(out in p.parents for p in opened), f"read outside the study folder: {opened}"
    assert Result.load(out / "tiny-gpt2" / "neurons").tables  # replaced by a sound result
    assert run_study(model, config=config, out_dir=out, progress=False, log=None, write_report=False).reused


@pytest.mark.parametrize("record", ["{}", '{"study": null}', "shard as a string", "a fifo", "[" * 100000])
def test_a_damaged_shard_record_is_one_line_exit_2(record: str, tmp_path: Path, corpus: Path) -> None:
    model = _tiny("m", "llama")
    config = StudyConfig(models=("m",), corpus=str(corpus), n_tokens=32, seq_len=16, batch_size=1,
                         analyses=("neurons",), static_formats=())
    run_shard(config, 0, 1, tmp_path / "s1", loaded={"m": model}, log=None)
    path = tmp_path / "s1" / "shard-1-of-1.json"
    if record == "a fifo":
        path.unlink()
        os.mkfifo(path)
    elif record == "shard as a string":
        data = json.loads(path.read_text())
        data["shard"] = "0"
        path.write_text(json.dumps(data))
    else:
        path.write_text(record)
    with pytest.raises(MergeError, match=str(path)):
        merge_studies([tmp_path / "s1"], tmp_path / "merged", log=None)
    done = _process(["merge", str(tmp_path / "s1"), "--out-dir", str(tmp_path / "m2")], timeout=60)
    assert done.returncode == cli.EXIT_USAGE and str(path) in _one_line(done.stderr)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "m2").exists()


# ------------------------------------------------------------------------------------ corpora
def test_a_corpus_folder_with_a_pipe_is_refused_without_opening_it(tmp_path: Path, tiny: str) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("w1 w2 w3. " * 200)
    os.mkfifo(folder / "b.txt")
    done = _process(["sweep", "--model", tiny, "--corpus", str(folder), "--n-tokens", "32", "--seq-len", "16",
                     "--quiet"], timeout=90)
    assert done.returncode == cli.EXIT_USAGE
    assert f"{folder / 'b.txt'} is not a regular file" in _one_line(done.stderr)
    done = _process(["sweep", "--model", tiny, "--corpus", str(folder / "b.txt"), "--quiet"], timeout=90)
    assert done.returncode == cli.EXIT_USAGE and "is not a regular file" in _one_line(done.stderr)


def test_a_folder_of_files_each_shorter_than_a_window_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "short"
    folder.mkdir()
    for i in range(300):
        (folder / f"{i:04d}.txt").write_text(f"w{i % 90} w{(i + 1) % 90}.")
    model = _tiny("m", "gpt2")
    with pytest.raises(ValueError, match=r"300 documents, each shorter than one window of 15 tokens \(the longest: "
                                         r"\d+ tokens\); a window never spans two documents"):
        soi.load_tokens(model, folder, n_sequences=2, seq_len=16)


# ------------------------------------------------------------------------------------ the API
def test_one_analysis_name_is_one_analysis_and_duplicates_run_once(tmp_path: Path, corpus: Path,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    tiny: str) -> None:
    assert StudyConfig(analyses="neurons").analyses == ("neurons",)
    with pytest.raises(ValueError, match=r"unknown analyses \['nurons'\]"):
        StudyConfig(analyses="nurons")
    out = tmp_path / "study"
    code = cli.main(["run", *_flags(tiny, corpus, "--analyses", "neurons,neurons,previous_token_attention"),
                     "--out-dir", str(out)])
    assert code == cli.EXIT_OK
    assert "note: analyses listed more than once run once: neurons" in capsys.readouterr().out
    assert json.loads((out / "study.json").read_text())["analyses"] == ["neurons", "previous_token_attention"]
    assert "(reused)" not in (out / "report.html").read_text()


# ------------------------------------------------------------------------------------ early messages
def test_a_bad_cloze_file_is_refused_before_any_model_work(tmp_path: Path, corpus: Path, tiny: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "items.jsonl"
    bad.write_text(json.dumps({"context": "w1 w2", "answer": "w3"}) + "\n{not json\n")
    code, err = _cli(["run", *_flags(tiny, corpus, "--analyses", "robustness,task"), "--cloze-file", str(bad),
                      "--out-dir", str(tmp_path / "o")], capsys)
    assert code == cli.EXIT_USAGE and f"{bad}:2 is not JSON" in _one_line(err)
    assert "robustness" not in capsys.readouterr().out and not (tmp_path / "o").exists()
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"context": "caf\u00e9 au lait", "answer": "w1"}\n'.encode("latin-1"))
    code, err = _cli(["run", *_flags(tiny, corpus, "--analyses", "task"), "--cloze-file", str(latin),
                      "--out-dir", str(tmp_path / "o")], capsys)
    assert code == cli.EXIT_USAGE and f"the cloze file {latin} is not UTF-8 text" in _one_line(err)


@pytest.mark.parametrize("seed", ["1e23", "99999999999999999999999", "-1"])
def test_a_seed_out_of_range_is_one_line(seed: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code, err = _cli(["run", "--seed", seed, "--out-dir", "/tmp/never-written"], capsys)
    except SystemExit as stop:  # argparse's own refusal of a value that is not a whole number
        code, err = stop.code, capsys.readouterr().err.strip()
    assert code == cli.EXIT_USAGE and "seed" in _one_line(err)
    assert not Path("/tmp/never-written").exists()

