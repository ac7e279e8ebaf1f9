"""What a careless or hostile user tries: each case ends quickly with one readable line and the
documented exit code (2: bad input, 3: not available here), before any model loads where it can."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import stages_of_inference as soi
from stages_of_inference import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """A server on loopback that accepts every connection and never answers (a firewalled hub)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)  # held open, never read from or written to
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        server.close()


def _cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The command in a fresh process, as a user runs it; bounded in time."""
    full = {**os.environ, **(env or {})}
    if env and env.get("HF_HUB_OFFLINE") == "":
        full.pop("HF_HUB_OFFLINE")
    return subprocess.run([sys.executable, "-m", "stages_of_inference.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=full)


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{text}"
    assert "Traceback" not in text
    return lines[0]


# ------------------------------------------------------------------------------------------- hangs
@pytest.mark.parametrize("args", [["run", "--model", "gpt2"], ["sweep", "--corpus", "someone/some-dataset"],
                                  ["run", "--corpus", "someone/some-dataset"]], ids=["model", "sweep-corpus", "run-corpus"])
def test_a_hub_that_never_answers_fails_in_bounded_time(args: list[str], silent_hub: str, tmp_path: Path) -> None:
    started = time.monotonic()
    extra = ["--out-dir", str(tmp_path / "out")] if args[0] == "run" else []
    done = _cli([*args, *extra, "--quiet"],
                env={"HF_ENDPOINT": silent_hub, "HF_HUB_OFFLINE": "", "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == cli.EXIT_UNAVAILABLE, done.stderr
    line = _one_line(done.stderr)
    assert "did not answer within" in line and silent_hub in line
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()  # nothing written for a run that could not start


def test_the_hub_probe_tells_offline_silent_and_refused_apart(silent_hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from stages_of_inference.models import hub_problem

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", silent_hub)
    assert "did not answer within 0.5 s" in hub_problem(timeout=0.5)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert "cannot be reached" in hub_problem(timeout=0.5)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_problem() == "HF_HUB_OFFLINE is set"


def test_a_dataset_name_without_a_hub_is_unavailable_not_a_hang(silent_hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from stages_of_inference.models import CorpusNotAvailableError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", silent_hub)
    with pytest.raises(CorpusNotAvailableError, match="did not answer"):
        list(soi.data._documents("someone/some-dataset", "text", "train")[0])


# ------------------------------------------------------------------------------------------- one line, exit 2
@pytest.mark.parametrize("device", ["banana", "cuda" if not torch.cuda.is_available() else "cuda:99"])
def test_a_device_this_torch_lacks_is_one_line_before_loading(device: str) -> None:
    for args in (["run", "--device", device, "--quiet"], ["sweep", "--device", device, "--quiet"]):
        done = _cli(args, timeout=60)
        assert done.returncode == cli.EXIT_USAGE, done.stderr
        line = _one_line(done.stderr)
        assert device in line and "cpu" in line  # what was asked, and what there is
    with pytest.raises(ValueError, match="this machine has: cpu"):
        soi.load_model("smollm2-135m", device=device)
    with pytest.raises(ValueError, match="device"):
        soi.study.StudyConfig(device=device)


@pytest.mark.parametrize("where", ["/proc/no-such-folder/out", "FILE/out"], ids=["read-only", "under-a-file"])
def test_an_unwritable_output_is_refused_before_loading(where: str, tmp_path: Path) -> None:
    if where.startswith("FILE"):
        (tmp_path / "FILE").write_text("a file, not a folder")
        where = str(tmp_path / where)
    for args in (["run", "--out-dir", where], ["sweep", "--out", where + ".csv"], ["lens", "--out", where + ".parquet"]):
        done = _cli([*args, "--quiet"], timeout=60)
        assert done.returncode == cli.EXIT_USAGE, done.stderr
        assert "cannot be written" in _one_line(done.stderr)


def test_bad_kinds_and_missing_corpus_files_are_refused_before_loading(tmp_path: Path) -> None:
    done = _cli(["sweep", "--kinds", "drop,delete", "--quiet"], timeout=60)
    assert done.returncode == cli.EXIT_USAGE and "unknown sweep kind" in _one_line(done.stderr)
    done = _cli(["run", "--corpus", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "o"), "--quiet"])
    assert done.returncode == cli.EXIT_USAGE and "no such corpus" in _one_line(done.stderr)
    assert not (tmp_path / "o").exists()


def test_help_imports_no_torch() -> None:
    code = ("import sys; from stages_of_inference.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'pandas', 'transformer_lens') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


# ------------------------------------------------------------------------------------------- files
def test_a_model_folder_with_unreadable_weights_is_one_line_exit_3(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    (folder / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    done = _cli(["neurons", "--model", str(folder), "--quiet"], timeout=120)
    assert done.returncode == cli.EXIT_UNAVAILABLE, done.stderr
    line = _one_line(done.stderr)
    assert "model.safetensors" in line and str(folder) in line and "expected a transformers checkpoint" in line


def test_a_corpus_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    from stages_of_inference.data import _documents

    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café au lait, déjà vu".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text"):
        _documents(str(latin), "text", "train")
    binary = tmp_path / "folder"
    binary.mkdir()
    (binary / "a.txt").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"a.txt is not UTF-8 text"):
        _documents(str(binary), "text", "train")


def test_counts_accept_numpy_integers_and_refuse_booleans() -> None:
    from stages_of_inference._checks import check_count

    assert check_count(np.int64(2), "n_sequences") == 2
    for bad in (True, 0, -1, 2.0, "2"):
        with pytest.raises(ValueError, match="n_sequences must be a positive integer"):
            check_count(bad, "n_sequences")


# ------------------------------------------------------------------------------------------- non-finite values
@pytest.fixture
def broken_model() -> torch.nn.Module:
    """A tiny model with one NaN in block 2's MLP output weights."""
    from conftest import make_tiny_model

    model = make_tiny_model("llama")
    with torch.no_grad():
        model.blocks[2].mlp.W_out[0, 0] = float("nan")
    return model


def test_a_nan_weight_stops_every_analysis_naming_where(broken_model: torch.nn.Module, tiny_tokens: torch.Tensor) -> None:
    from stages_of_inference.metrics import NonFiniteError
    from stages_of_inference.stages import (
        detokenization,
        feature_engineering,
        prediction_ensembling,
        residual_sharpening,
    )

    with pytest.raises(NonFiniteError, match=r"block 2 \(step 2 of the plan\) first outputs non-finite values"):
        soi.robustness_sweep(broken_model, tiny_tokens, progress=False)
    with pytest.raises(NonFiniteError, match="block 2"):
        soi.robustness_sweep(broken_model, tiny_tokens, progress=False, fast_path=False)
    for convention in ("paper", "per_layer_norm"):
        with pytest.raises(NonFiniteError, match="residual stream entering block 3"):
            feature_engineering.logit_lens(broken_model, tiny_tokens, convention=convention, progress=False)
    with pytest.raises(NonFiniteError, match="residual stream entering block 3"):  # the first to read block 2's output
        detokenization.previous_token_attention(broken_model, tiny_tokens, k=2, progress=False)
    with pytest.raises(NonFiniteError, match="block 2"):
        residual_sharpening.final_block_ablation(broken_model, tiny_tokens, progress=False)
    with pytest.raises(NonFiniteError, match="residual stream entering block 3"):
        feature_engineering.layer_similarity(broken_model, tiny_tokens, progress=False)
    with pytest.raises(NonFiniteError, match="block 2's MLP output weights"):
        prediction_ensembling.neuron_moments(broken_model, progress=False)
    assert torch.isnan(soi.run_plan(broken_model, tiny_tokens, soi.LayerPlan.identity(4))).any()  # raw logits stay raw


def test_a_nan_in_the_unembedding_stops_the_lens(tiny_tokens: torch.Tensor) -> None:
    """The residual stream is finite, the unembedding is not: the lens says so, from its first readout."""
    from conftest import make_tiny_model

    from stages_of_inference.metrics import NonFiniteError
    from stages_of_inference.stages import feature_engineering

    model = make_tiny_model("gpt2")
    with torch.no_grad():
        model.unembed.W_U[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"the logit lens \(per_layer_norm\) is NaN or infinite from readout 0"):
        feature_engineering.logit_lens(model, tiny_tokens, convention="per_layer_norm", progress=False)
    with pytest.raises(NonFiniteError, match="the final norm or the unembedding"):
        soi.robustness_sweep(model, tiny_tokens, progress=False)


def test_an_infinite_weight_is_named_by_the_first_plan_that_runs_it(tiny_tokens: torch.Tensor) -> None:
    """An infinity in the last block's weights: the unmodified model, scored first, is the plan
    named, with the block where its residual first stops being finite."""
    from conftest import make_tiny_model

    from stages_of_inference.metrics import NonFiniteError

    model = make_tiny_model("gpt2")
    with torch.no_grad():
        model.blocks[3].mlp.W_out[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"the plan \[0, 1, 2, 3\] .* block 3"):
        soi.robustness_sweep(model, tiny_tokens, progress=False)


# ------------------------------------------------------------------------------------------- the model cache
def _fake_conversion(parts, gguf_name, out):  # noqa: ANN001, ANN202 - writes a small valid entry
    import json

    from stages_of_inference._utils import file_sha256

    (out / "model.safetensors").write_bytes(b"weights" * 100)
    (out / "config.json").write_text("{}")
    files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(out.iterdir())}
    (out / "manifest.json").write_text(json.dumps({"format": 1, "files": files}))
    _fake_conversion.calls += 1


@pytest.mark.parametrize("damage", ["file for folder", "no manifest", "truncated weights", "stale temporary"])
def test_a_damaged_cache_entry_is_detected_removed_and_rebuilt_once(damage: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from stages_of_inference import models

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion)
    _fake_conversion.calls = 0
    source = tmp_path / "m.gguf"
    source.write_bytes(b"gguf")
    entry = models._converted("m-0123", [source], "m.gguf")
    assert _fake_conversion.calls == 1 and models._entry_is_valid(entry)
    assert models._converted("m-0123", [source], "m.gguf") == entry and _fake_conversion.calls == 1  # reused
    stale = entry.parent / ".m-0123.k1ll3d.tmp"
    if damage == "file for folder":
        shutil.rmtree(entry)
        entry.write_text("not a folder")
    elif damage == "no manifest":
        (entry / "manifest.json").unlink()
    elif damage == "truncated weights":
        weights = entry / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:10])
    else:  # a conversion killed before its rename: no entry, a temporary left behind
        shutil.rmtree(entry)
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"half")
    with pytest.warns(UserWarning, match="damaged; rebuilding") if damage != "stale temporary" else _no_warning():
        again = models._converted("m-0123", [source], "m.gguf")
    assert again == entry and entry.is_dir() and models._entry_is_valid(entry) and _fake_conversion.calls == 2
    assert not stale.exists() and not list(entry.parent.glob(".m-0123.*.tmp"))


def test_a_rebuild_that_stays_invalid_is_an_error_naming_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages_of_inference import models

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", lambda parts, name, out: (out / "model.safetensors").write_bytes(b"x"))
    source = tmp_path / "m.gguf"
    source.write_bytes(b"gguf")
    with pytest.raises(models.ModelNotAvailableError, match=r"cache entry .*m-0123 is not valid even after it was rebuilt"):
        models._converted("m-0123", [source], "m.gguf")


def test_two_processes_converting_one_model_do_not_collide(tmp_path: Path) -> None:
    """Two processes ask for the same entry at once: one converts, the other waits and reuses it."""
    script = (
        "import sys, time, json\n"
        "from stages_of_inference import models\n"
        "from tests.test_reliability import _fake_conversion\n"
        "def slow(parts, name, out):\n"
        "    time.sleep(2); _fake_conversion(parts, name, out); print('converted', flush=True)\n"
        "_fake_conversion.calls = 0\n"
        "models._convert_gguf = slow\n"
        "print(models._converted('m-0123', [sys.argv[1]], 'm.gguf'), flush=True)\n"
    )
    source = tmp_path / "m.gguf"
    source.write_bytes(b"gguf")
    env = {**os.environ, "STAGES_OF_INFERENCE_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(source)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(out.count("converted") for out in outs) == 1, outs  # one converted, the other reused
    assert len({out.strip().splitlines()[-1] for out in outs}) == 1


@contextlib.contextmanager
def _no_warning() -> Iterator[None]:
    yield


@pytest.mark.real
def test_the_embedded_model_rebuilds_a_damaged_cache_entry_from_the_cli(tmp_path: Path) -> None:
    """The audit's case, for real: the cache entry of the embedded model is a file, and a killed
    conversion left its temporary folder; the study rebuilds the entry and completes."""
    from stages_of_inference import models

    entry = models.EMBEDDED_MODELS["smollm2-135m"]
    parts = entry.part_paths()
    assert parts is not None, "the embedded model's weights package is not installed"
    cache = tmp_path / "cache"
    name = f"{entry.key}-{models._fingerprint([entry.key, *(f'{p.name}:{p.stat().st_size}' for p in parts)])}"
    folder = cache / "models" / name
    folder.parent.mkdir(parents=True)
    folder.write_text("a file where the converted model belongs")
    stale = folder.parent / f".{name}.killed.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half-written")
    out = tmp_path / "study"
    done = _cli(["run", "--analyses", "sinks", "--n-tokens", "256", "--out-dir", str(out), "--quiet"],
                env={"STAGES_OF_INFERENCE_CACHE": str(cache)}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "report.html").exists() and (out / "smollm2-135m" / "sinks" / "profile.parquet").exists()
    assert "Loading weights" not in done.stderr  # --quiet silences transformers' bars too
    assert folder.is_dir() and models._entry_is_valid(folder) and not stale.exists()
