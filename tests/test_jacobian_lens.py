"""The Jacobian lens: the estimator against torch's own Jacobian and against TransformerLens's
``JacobianLens.fit`` (the oracle, on a raw Bridge of the same checkpoint); its artifacts read
without unpickling; a fitted lens as a lens convention. Runs under both TransformerLens generations
(Makefile: BACKEND_TESTS)."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch

from stages_of_inference._tl import HAS_BRIDGE, HAS_HOOKED, TransformerBridge
from stages_of_inference.jacobian_lens import (
    fit_jacobian_lens,
    from_jacobians,
    load_jacobian_lens,
    read_torch_artifact,
)
from stages_of_inference.stages.feature_engineering import logit_lens
from stages_of_inference.tuned_lens import load_tuned_lens, save_tuned_lens

SKIP = 2


def _reference_jacobians(model, tokens: torch.Tensor, skip: int) -> torch.Tensor:  # noqa: ANN001
    """The estimator from its formula: for each prompt and readout k, torch.autograd.functional's
    full Jacobian of the last block's output (every position) with respect to readout k (every
    position), summed over valid targets, averaged over valid sources, then over prompts."""
    n, d = model.cfg.n_layers, model.cfg.d_model
    out = torch.zeros(n, d, d, dtype=torch.float64)
    for row in tokens:
        prompt = row[None]
        seq = prompt.shape[1]
        valid = list(range(skip, seq - 1))
        _, cache = model.run_with_cache(prompt)
        for k in range(n):
            name = f"blocks.{k}.hook_resid_pre"

            def final_from(x: torch.Tensor, name: str = name) -> torch.Tensor:
                box = {}
                model.run_with_hooks(prompt, return_type=None, fwd_hooks=[
                    (name, lambda act, hook: x), (f"blocks.{n - 1}.hook_resid_post", lambda act, hook: box.setdefault("y", act))])
                return box["y"][0]

            jac = torch.autograd.functional.jacobian(final_from, cache[name].detach().clone())  # [t', i, 1, t, j]
            jac = jac[:, :, 0]
            total = sum(jac[tp, :, t, :] for t in valid for tp in valid)
            out[k] += total.double() / len(valid)
    return (out / tokens.shape[0]).float()


@pytest.mark.skipif(not HAS_HOOKED, reason="the reference runs a HookedTransformer")
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fit_equals_the_jacobian_from_its_formula(family: str) -> None:
    from tests.conftest import make_tiny_model

    model = make_tiny_model(family)
    tokens = torch.randint(1, 101, (2, 7), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = 0
    lens = fit_jacobian_lens(model, tokens, dim_batch=5, skip_first_positions=SKIP, progress=False)  # 32 = 6 x 5 + 2
    eye = torch.eye(model.cfg.d_model)
    torch.testing.assert_close(lens.weight.transpose(1, 2) + eye, _reference_jacobians(model, tokens, SKIP),
                               atol=2e-5, rtol=1e-4)
    assert lens.kind == "jacobian" and float(lens.bias.abs().max()) == 0.0


@pytest.mark.skipif(not HAS_HOOKED, reason="a tiny HookedTransformer")
def test_a_jacobian_lens_is_a_lens_convention(tiny_tokens) -> None:  # noqa: ANN001
    from tests.conftest import make_tiny_model

    model = make_tiny_model("llama")
    n, d = model.cfg.n_layers, model.cfg.d_model
    identity = from_jacobians(torch.eye(d).repeat(n, 1, 1), {})
    a = logit_lens(model, tiny_tokens, convention=identity, progress=False)
    b = logit_lens(model, tiny_tokens, convention="per_layer_norm", progress=False)
    assert (a["convention"] == "jacobian").all()
    columns = [c for c in a.columns if c != "convention"]
    assert a[columns].equals(b[columns])
    fitted = fit_jacobian_lens(model, tiny_tokens[:2], skip_first_positions=SKIP, progress=False)
    assert set(logit_lens(model, tiny_tokens, convention=fitted, progress=False)["convention"]) == {"jacobian"}


# --------------------------------------------------------------------------- TransformerLens's own tool
@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - (raw Bridge, compatibility-mode Bridge, prompts)
    if not HAS_BRIDGE:
        pytest.skip("this TransformerLens has no TransformerBridge")
    from tests.test_bridge import _hf_model, _tokenizer

    tokenizer = _tokenizer(tmp_path_factory)
    reference = _hf_model("llama")
    raw = TransformerBridge.boot_transformers("tiny-llama", hf_model=copy.deepcopy(reference), tokenizer=tokenizer)
    compat = TransformerBridge.boot_transformers("tiny-llama", hf_model=copy.deepcopy(reference), tokenizer=tokenizer)
    compat.enable_compatibility_mode()
    gen = torch.Generator().manual_seed(5)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 99, (9,), generator=gen)) for _ in range(3)]
    return raw, compat, prompts


def test_fit_equals_transformer_lens_jacobian_lens(llama) -> None:  # noqa: ANN001
    """TransformerLens's ``JacobianLens.fit`` on the raw Bridge is the oracle; the library fits on
    the compatibility-mode Bridge of the same checkpoint (RMSNorm: the same residual basis)."""
    tool = pytest.importorskip("transformer_lens.tools.analysis.jacobian_lens")
    raw, compat, prompts = llama
    theirs = tool.JacobianLens.fit(raw, prompts, corpus="tiny words", dim_batch=8, max_seq_len=64,
                                   skip_first_positions=SKIP, show_progress=False)
    tokens = raw.to_tokens(prompts)
    assert tokens.shape[1] == 10  # BOS and nine words: every prompt the same length
    ours = fit_jacobian_lens(compat, tokens, dim_batch=8, skip_first_positions=SKIP, progress=False)
    eye = torch.eye(compat.cfg.d_model)
    assert theirs.source_layers == list(range(compat.cfg.n_layers - 1))
    for layer in theirs.source_layers:  # their block l's output is the library's readout l + 1
        torch.testing.assert_close(ours.weight[layer + 1].T + eye, theirs.jacobians[layer], atol=2e-5, rtol=1e-4)


def test_transformer_lens_artifacts_are_read_without_unpickling(llama, tmp_path) -> None:  # noqa: ANN001
    raw, compat, prompts = llama
    n, d = compat.cfg.n_layers, compat.cfg.d_model
    gen = torch.Generator().manual_seed(9)
    jacobians = {layer: torch.randn(d, d, generator=gen).half().float() for layer in range(n - 1)}
    path = tmp_path / "lens.pt"
    try:
        from transformer_lens.tools.analysis.jacobian_lens import JacobianLens

        JacobianLens(jacobians, n_prompts=3, d_model=d, metadata={"corpus": "tiny words"}).save(str(path))
    except ImportError:  # no tool: the payload it writes, written the same way
        torch.save({"J": {k: v.half() for k, v in jacobians.items()}, "n_prompts": 3, "source_layers": list(jacobians),
                    "d_model": d, "metadata": {"corpus": "tiny words"}}, path)
    payload = read_torch_artifact(path)
    assert payload["n_prompts"] == 3 and payload["d_model"] == d and payload["metadata"]["corpus"] == "tiny words"
    lens = load_jacobian_lens(path, compat)
    eye = torch.eye(d)
    torch.testing.assert_close(lens.weight[0], torch.zeros(d, d))  # the embeddings: not in the artifact
    for layer, matrix in jacobians.items():
        torch.testing.assert_close(lens.weight[layer + 1].T + eye, matrix, atol=0, rtol=0)
    save_tuned_lens(lens, tmp_path / "lens.safetensors")  # our own format keeps the kind
    assert load_jacobian_lens(tmp_path / "lens.safetensors", compat).kind == "jacobian"
    assert load_tuned_lens(tmp_path / "lens.safetensors").kind == "jacobian"


class _Sneaky:
    def __reduce__(self):  # noqa: ANN204 - what a malicious pickle does: call something on load
        return (os.system, ("echo never",))


def test_artifacts_naming_anything_else_are_refused_unexecuted(llama, tmp_path) -> None:  # noqa: ANN001
    raw, compat, prompts = llama
    torch.save({"J": {0: torch.zeros(2, 2)}, "hook": _Sneaky()}, tmp_path / "sneaky.pt")
    with pytest.raises(ValueError, match="its pickle names 'posix system'|its pickle names 'nt system'"):
        read_torch_artifact(tmp_path / "sneaky.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"J": 1}))
    with pytest.raises(ValueError, match="not a torch.save archive"):
        read_torch_artifact(tmp_path / "plain.pkl")
    torch.save({"J": {0: torch.zeros(3, 3)}}, tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match="this model's width is"):
        load_jacobian_lens(tmp_path / "narrow.pt", compat)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a Jacobian-lens artifact"):
        load_jacobian_lens(tmp_path / "other.pt", compat)
