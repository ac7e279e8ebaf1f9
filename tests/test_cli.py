"""The command line: help on every command, one-line errors, meaningful exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stages_of_inference import cli

COMMANDS = ("run", "sweep", "neurons", "lens", "models")


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"] if command is None else [command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: stages-of-inference" in out
    if command is None:
        assert all(c in out for c in COMMANDS) and "Exit codes" in out
    if command == "run":
        assert "--n-tokens" in out and "--out-dir" in out and "--model" in out


@pytest.mark.parametrize("argv, needle", [
    ([], "required"),
    (["bogus"], "invalid choice"),
    (["run", "--n-tokens", "0"], "positive"),
    (["run", "--n-tokens", "many"], "whole number"),
    (["lens", "--convention", "sideways"], "invalid choice"),
])
def test_bad_arguments_are_one_line_with_exit_code_2(argv: list[str], needle: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_input_is_one_line_with_exit_code_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = cli.main(["run", "--seq-len", "4", "--out-dir", str(tmp_path)])
    assert code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("stages-of-inference: error: seq_len") and err.count("\n") == 1


def test_unknown_model_exits_3(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli.main(["neurons", "--model", "no-such-model-xyz"])
    assert code == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert "no-such-model-xyz" in err and "Traceback" not in err


def test_mismatch_exits_4_and_interrupt_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    from stages_of_inference import study as report

    def mismatch(**kwargs):  # noqa: ANN003, ANN202
        raise report.StudyMismatchError("reports/x holds a finished analysis made with other settings")

    monkeypatch.setattr(report, "run_study", mismatch)
    assert cli.main(["run", "--out-dir", str(tmp_path), "--on-mismatch", "error"]) == cli.EXIT_MISMATCH
    assert "other settings" in capsys.readouterr().err

    def interrupted(**kwargs):  # noqa: ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "run_study", interrupted)
    assert cli.main(["run", "--out-dir", str(tmp_path)]) == cli.EXIT_INTERRUPTED
    assert "resume" in capsys.readouterr().err


def test_run_passes_its_options_to_the_study(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    from stages_of_inference import study as report
    from stages_of_inference.study.registry import fast_analyses

    seen = {}

    def fake(**kwargs):  # noqa: ANN003, ANN202
        seen.update(kwargs)
        return report.Study(config=kwargs["config"], out_dir=Path(kwargs["out_dir"]))

    monkeypatch.setattr(report, "run_study", fake)
    code = cli.main(["run", "--model", "smollm2-135m", "--model", "gemma3-270m", "--n-tokens", "512",
                     "--analyses", "fast", "--format", "csv", "--no-static", "--quiet"])
    assert code == 0
    config = seen["config"]
    assert config.models == ("smollm2-135m", "gemma3-270m") and config.n_tokens == 512
    assert config.analyses == fast_analyses() and config.table_format == "csv" and config.static_formats == ()
    assert seen["out_dir"] == Path("reports/smollm2-135m+gemma3-270m") and seen["progress"] is False
    assert "report.html" in capsys.readouterr().out


def test_models_lists_the_embedded_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out


def test_console_script_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "stages_of_inference.cli", "lens", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 0 and "--convention" in done.stdout


@pytest.mark.real
def test_lens_and_sweep_on_the_real_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lens.csv"
    assert cli.main(["lens", "--n-tokens", "128", "--seq-len", "64", "--convention", "paper", "--quiet",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "entropy_bits" in text and out.exists() and Path(str(out) + ".json").exists()
    assert cli.main(["sweep", "--n-tokens", "128", "--seq-len", "64", "--kinds", "drop", "--quiet"]) == 0
    assert "relative_accuracy" in capsys.readouterr().out
