"""The load-time self-check (:mod:`stages_of_inference.self_check`): every model ``load_model``
builds from a checkpoint is compared with the checkpoint's own Hugging Face forward; a family the
library would compute wrongly is refused in one line, and a Bridge that compatibility mode alone
moves runs on raw weights, saying so.

Tiny random models of several families are saved as transformers checkpoints and loaded back as a
user would (``load_model(folder)``). The references are computed here from the Hugging Face models
themselves. These tests run under TransformerLens 3.9 (``.venv``) and 4.3 (``.venv-tl4``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hf_reference import transformers_own_attention
from test_bridge import _hf_model, _tokenizer

import stages_of_inference as soi
from stages_of_inference import LayerPlan, run_plan
from stages_of_inference._tl import HAS_BRIDGE, HAS_HOOKED, TL_VERSION
from stages_of_inference.backends import weight_mode
from stages_of_inference.backends.bridge import BridgeSeam
from stages_of_inference.models import ModelNotAvailableError
from stages_of_inference.results import provenance
from stages_of_inference.self_check import TOLERANCE_NATS, finding

pytestmark = pytest.mark.skipif(not HAS_BRIDGE, reason="this TransformerLens has no TransformerBridge")

BRIDGE_FAMILIES = ("llama", "gemma3", "gpt2", "neox", "bloom", "mpt", "granite", "cohere")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return _tokenizer(tmp_path_factory)


def _saved(family: str, tokenizer, folder, **config) -> torch.nn.Module:  # noqa: ANN001
    """A tiny model of ``family`` saved as a transformers checkpoint in ``folder``; returns it."""
    model = _hf_model(family)
    for key, value in config.items():
        setattr(model.config, key, value)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model


def _kl(reference: torch.Tensor, found: torch.Tensor) -> float:
    """The largest KL divergence at any position, written out here (not the library's helper)."""
    p = torch.softmax(reference.double(), -1)
    return float((p * (torch.log(p) - torch.log_softmax(found.double(), -1))).sum(-1).max())


@pytest.mark.parametrize("family", BRIDGE_FAMILIES)
def test_every_family_loaded_on_the_bridge_is_checked_against_its_own_forward(family: str, tokenizer, tmp_path) -> None:  # noqa: ANN001
    reference = _saved(family, tokenizer, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = soi.load_model(tmp_path, backend="bridge")
    found = finding(model)
    assert found is not None and found.passed and found.kl_nats <= TOLERANCE_NATS and found.tokens == 24
    tokens = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), transformers_own_attention():
        expected = reference(tokens).logits
    assert _kl(expected, run_plan(model, tokens, LayerPlan.identity(4))) < 1e-4
    moved = [str(w.message) for w in caught if "compatibility mode" in str(w.message)]
    if family == "cohere" and TL_VERSION.startswith("3."):
        # TransformerLens 3.9 folds Cohere's logit_scale into the unembedding in compatibility mode
        # while its adapter still applies it: the check sees the model moved and runs it raw
        assert found.weights == "raw" == weight_mode(model) and "compatibility mode" in found.reason
        assert len(moved) == 1 and "CohereForCausalLM" in moved[0] and "raw weights" in moved[0]
    else:
        assert found.weights == "processed" == weight_mode(model) and not moved
    record = provenance(model)["model"]["self_check"]
    assert record["kl_nats"] == found.kl_nats and record["weights"] == found.weights


@pytest.mark.skipif(not HAS_HOOKED, reason="this TransformerLens has no HookedTransformer")
@pytest.mark.parametrize("family", ["llama", "qwen3", "neox", "phi3"])
def test_every_family_loaded_as_a_hooked_transformer_is_checked(family: str, tokenizer, tmp_path) -> None:  # noqa: ANN001
    _saved(family, tokenizer, tmp_path)
    found = finding(soi.load_model(tmp_path, backend="hooked"))
    assert found is not None and found.passed and found.weights == "processed"


def test_a_family_whose_output_the_library_would_get_wrong_is_refused_at_load(tokenizer, tmp_path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Granite divides its logits by ``logits_scaling``; a library that forgot to (as this one did
    before the output transforms were read off the adapter) is 0.99 nats off: refused, one line."""
    _saved("granite", tokenizer, tmp_path)
    monkeypatch.setattr(BridgeSeam, "logit_scale", property(lambda self: 1.0))
    with pytest.raises(ModelNotAvailableError, match=r"^GraniteForCausalLM: the library's forward of this model "
                       r"differs from its Hugging Face forward by [0-9.e-]+ nats") as caught:
        soi.load_model(tmp_path, backend="bridge")
    assert "\n" not in str(caught.value) and "docs/backends.md" in str(caught.value)


def test_a_crash_of_the_librarys_forward_at_load_is_one_line_naming_the_family(tokenizer, tmp_path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    _saved("neox", tokenizer, tmp_path)

    def broken(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise AttributeError("'TransformerBridge' object has no attribute 'ln_final'")

    monkeypatch.setattr(BridgeSeam, "final_norm", broken)
    with pytest.raises(ModelNotAvailableError, match=r"^GPTNeoXForCausalLM: the library cannot run this model's "
                       r"blocks \(AttributeError: .*ln_final") as caught:
        soi.load_model(tmp_path, backend="bridge")
    assert "\n" not in str(caught.value)


def test_a_model_object_that_compatibility_mode_moves_is_refused_with_what_to_do(tokenizer) -> None:  # noqa: ANN001
    """The user's own object cannot be rebuilt raw (compatibility mode changed it in place)."""
    model = _hf_model("cohere")
    if not TL_VERSION.startswith("3."):
        assert finding(soi.load_model(copy.deepcopy(model), tokenizer=tokenizer)).passed
        return
    with pytest.raises(ModelNotAvailableError, match=r"^CohereForCausalLM: compatibility mode .* moves this model's "
                       r"outputs by .*save_pretrained\(folder\) and load the folder"):
        soi.load_model(model, tokenizer=tokenizer)


@pytest.mark.skipif(not HAS_HOOKED, reason="this TransformerLens has no HookedTransformer")
def test_a_hooked_transformer_refuses_per_layer_sliding_windows_it_would_ignore(tokenizer, tmp_path) -> None:  # noqa: ANN001
    """Qwen2 with sliding-window layers: TransformerLens 3.9's HookedTransformer attends over the
    whole context there; refused at load, pointing to the Bridge, which loads it and checks it on
    24 tokens, longer than the window of 6."""
    import transformers as tf

    config = tf.Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            use_sliding_window=True, sliding_window=6, max_window_layers=2)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    tf.Qwen2ForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    assert "sliding_attention" in tf.AutoConfig.from_pretrained(tmp_path).layer_types
    with pytest.raises(ModelNotAvailableError, match=r"^Qwen2ForCausalLM in .*: its layers attend within a sliding "
                       r"window of 6 tokens, which TransformerLens' HookedTransformer ignores .*backend='bridge'$"):
        soi.load_model(tmp_path, backend="hooked")
    assert finding(soi.load_model(tmp_path, backend="bridge")).passed


def _documented_rows(version: str) -> dict[tuple[str, str], tuple[str, str]]:
    """docs/backends.md's family table for TransformerLens ``version``: (family, backend) to
    (status word, fast path)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "backends.md").read_text()
    table = text.split(f"TransformerLens {version}, transformers")[1].split("\n\n")[1]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {(r[0], r[1]): (r[2].split(":")[0], r[3]) for r in rows}


@pytest.mark.parametrize("family", ["Llama", "Qwen2, sliding layers", "Bloom", "CodeGen", "Phi", "Granite"])
def test_the_documented_family_table_is_what_the_script_finds(family: str, tmp_path) -> None:  # noqa: ANN001
    """A sample of docs/backends.md's table, rerun with tools/family_table.py in this TransformerLens."""
    import importlib.util
    from pathlib import Path

    from stages_of_inference._tl import backends_available

    path = Path(__file__).resolve().parents[1] / "tools" / "family_table.py"
    spec = importlib.util.spec_from_file_location("family_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    documented = _documented_rows(TL_VERSION.split("+")[0])
    prepared = table.prepare(family, tmp_path, table._tokenizer(tmp_path / "tokenizer"))
    for backend in backends_available():
        cells = [cell.strip() for cell in table.row(family, backend, prepared).strip("|").split("|")]
        assert (cells[2].split(":")[0], cells[3]) == documented[(family, backend)], (family, backend, cells)


def test_the_lens_refuses_a_final_norm_it_would_read_wrongly(tokenizer, tmp_path) -> None:  # noqa: ANN001
    """Nemotron's final norm is a LayerNorm with its weight stored as an offset from 1. TransformerLens
    4.3's Bridge says so and the lens reads it right; 3.9's does not, and the lens would be 0.5 nats
    off at the output: the load-time check finds it and the lens refuses the model in one line."""
    from stages_of_inference.lens import lens_logits

    reference = _saved("nemotron", tokenizer, tmp_path)
    model = soi.load_model(tmp_path, backend="bridge")
    tokens = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(3))
    if TL_VERSION.startswith("3."):
        assert "NemotronLayerNorm1P" in finding(model).lens
        with pytest.raises(NotImplementedError, match=r"^the logit lens cannot read this model's final norm "
                           r"\(NemotronLayerNorm1P\): a LayerNorm with .* by a relative 0\.\d+; supported") as caught:
            lens_logits(model, tokens, convention="per_layer_norm")
        assert "\n" not in str(caught.value)
        return
    assert finding(model).lens == ""
    with torch.no_grad(), transformers_own_attention():
        expected = reference(tokens).logits.double()
    left_out = model.b_U.double() + model.ln_final.bias.double() @ model.W_U.double()
    lens = lens_logits(model, tokens, convention="per_layer_norm", points=[4])[-1]
    assert _kl(expected - left_out, lens) < 1e-4
