"""The table of Hugging Face families in docs/backends.md: which load, which are right, which are
refused and why, which take the fast path. Run under each TransformerLens version:

    python tools/family_table.py            # .venv: TransformerLens 3.9, both backends
    .venv-tl4/bin/python tools/family_table.py

For each family, a tiny random model (hidden 64, 4 layers, weights N(0, 0.2), so every block
matters) is built offline from transformers' own config class, saved as a checkpoint and loaded as
a user would (``load_model(folder, backend=...)``). A model that loads is compared, on 2 x 16
tokens, with the Hugging Face model's own forward with its layer list reordered (and
``config.layer_types`` with it) for the unmodified model, every deletion and every swap: the
largest difference of a plan's KL (from the unmodified output) between library and reference.
"right" means within 1e-4 nats. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import inspect
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from torch import nn  # noqa: E402

import stages_of_inference as soi  # noqa: E402
from stages_of_inference._tl import TL_VERSION, backends_available  # noqa: E402
from stages_of_inference.backends import as_seam  # noqa: E402
from stages_of_inference.lens import lens_logits  # noqa: E402
from stages_of_inference.models import ModelNotAvailableError  # noqa: E402

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "Llama": ("Llama", {}),
    "Mistral": ("Mistral", {"sliding_window": None}),
    "Mixtral": ("Mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "Qwen2": ("Qwen2", {}),
    "Qwen2, sliding layers": ("Qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 2}),
    "Qwen2-MoE": ("Qwen2Moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                               "shared_expert_intermediate_size": 32}),
    "Qwen3": ("Qwen3", {"head_dim": 16}),
    "Qwen3-MoE": ("Qwen3Moe", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "Gemma": ("Gemma", {"head_dim": 16}),
    "Gemma 2": ("Gemma2", {"head_dim": 16, "sliding_window": 32, "attn_logit_softcapping": 5.0,
                           "final_logit_softcapping": 3.0}),
    "Gemma 3": ("Gemma3Text", {"head_dim": 16, "sliding_window": 6,
                               "layer_types": ["sliding_attention", "full_attention"] * 2}),
    "GPT-2": ("GPT2", {"n_positions": 128}),
    "GPT-NeoX": ("GPTNeoX", {"use_parallel_residual": True, "rotary_pct": 0.5}),
    "GPT-J": ("GPTJ", {"n_positions": 128, "rotary_dim": 8}),
    "Phi": ("Phi", {}),
    "Phi-3": ("Phi3", {"pad_token_id": 0}),
    "OLMo": ("Olmo", {}),
    "OLMo 2": ("Olmo2", {}),
    "OLMo 3": ("Olmo3", {"sliding_window": 6}),
    "StableLM": ("StableLm", {}),
    "Falcon": ("Falcon", {"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True}),
    "Falcon, new decoder": ("Falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "Bloom": ("Bloom", {}),
    "MPT": ("Mpt", {"d_model": 64, "n_heads": 4, "n_layers": 4, "max_seq_len": 128, "expansion_ratio": 2}),
    "OPT": ("OPT", {"ffn_dim": 96, "word_embed_proj_dim": 64}),
    "OPT-350m layout": ("OPT", {"ffn_dim": 96, "word_embed_proj_dim": 32, "do_layer_norm_before": False}),
    "CodeGen": ("CodeGen", {"n_positions": 128, "rotary_dim": 8}),
    "Granite": ("Granite", {"logits_scaling": 4.0, "residual_multiplier": 0.5, "embedding_multiplier": 2.0}),
    "Cohere": ("Cohere", {"logit_scale": 0.25}),
    "StarCoder2": ("Starcoder2", {"sliding_window": None}),
    "GPT-BigCode": ("GPTBigCode", {"n_positions": 128}),
    "GLM-4": ("Glm4", {"head_dim": 16, "pad_token_id": 0}),
    "Nemotron": ("Nemotron", {"head_dim": 16}),
    "SmolLM3": ("SmolLM3", {"pad_token_id": 0}),
    "Ministral": ("Ministral", {"head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "sliding_window": 6,
                                "layer_types": ["sliding_attention", "full_attention"] * 2}),
    "VaultGemma": ("VaultGemma", {"head_dim": 16}),
    "Falcon-H1": ("FalconH1", {"head_dim": 16, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16,
                               "mamba_n_groups": 1, "mamba_d_state": 8, "mamba_chunk_size": 16}),
    "GPT-OSS": ("GptOss", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 6,
                           "layer_types": ["sliding_attention", "full_attention"] * 2}),
    "BitNet": ("BitNet", {}),
}


def _tokenizer(folder: Path) -> Any:
    words = ["<bos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>").save_pretrained(folder)
    return tf.PreTrainedTokenizerFast.from_pretrained(folder)


def build(prefix: str, extra: dict[str, Any]) -> nn.Module:
    """A tiny random model of the family whose classes start with ``prefix``."""
    config_cls = getattr(tf, f"{prefix}Config")
    model_cls = (tf.Gemma3ForCausalLM if prefix == "Gemma3Text"
                 else getattr(tf, f"{prefix}ForCausalLM", None) or getattr(tf, f"{prefix}LMHeadModel"))
    accepted = set(inspect.signature(config_cls.__init__).parameters) | set(getattr(config_cls, "attribute_map", {}))
    config = config_cls(**{**{k: v for k, v in COMMON.items() if k in accepted}, **extra})
    config.architectures = [model_cls.__name__]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
            elif "norm" in name or "ln" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    n = model.config.num_hidden_layers
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                return module, name
    raise LookupError("no layer list")


def reference_logits(model: nn.Module, tokens: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """The Hugging Face forward with its layer list (and ``layer_types``) put in ``order``."""
    owner, name = _layer_list(model)
    original, config = getattr(owner, name), model.config
    n, types = config.num_hidden_layers, getattr(config, "layer_types", None)
    setattr(owner, name, nn.ModuleList([original[i] for i in order]))
    attribute = getattr(type(config), "attribute_map", {}).get("layer_types", "layer_types")
    settable = not isinstance(getattr(type(config), attribute, None), property)  # Falcon-H1 derives its types
    try:
        config.num_hidden_layers = len(order)
        if types is not None and settable:
            config.layer_types = [types[i] for i in order]
        with torch.no_grad():
            return model(tokens, use_cache=False).logits.double()
    finally:
        setattr(owner, name, original)
        config.num_hidden_layers = n
        if types is not None and settable:
            config.layer_types = types


ATTENTIONS = ("self_attn", "self_attention", "attn", "attention")
MLPS = ("mlp", "ffn", "feed_forward", "block_sparse_moe")
OUTPUT_PROJECTIONS = ("o_proj", "dense", "out_proj", "c_proj", "down_proj", "fc2", "dense_4h_to_h", "fc_out", "wo", "w2")


def output_parameters(layer: nn.Module, part: str) -> list[nn.Parameter]:
    """The parameters of the projections a sublayer's output passes through last, found by the
    Hugging Face layer's own names: those of its attention or MLP module owned by a part with one
    of the usual output names (``o_proj``, ``down_proj``, ``c_proj``, ...; a mixture of experts'
    stacked ``experts.down_proj`` and its shared expert's included). Empty where there are none (a
    hybrid mixer: not checked).
    """
    names = ATTENTIONS if part == "attn" else MLPS
    module = next((getattr(layer, name) for name in names if isinstance(getattr(layer, name, None), nn.Module)), None)
    if module is None and part == "mlp" and isinstance(getattr(layer, "fc2", None), nn.Module):
        return list(layer.fc2.parameters())  # OPT's MLP has no module of its own: fc1 and fc2 sit on the layer
    if module is None:
        return []
    found = []
    for name, value in module.named_parameters():
        parts = name.split(".")
        owner = parts[-2] if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1].removesuffix("_bias")
        if owner in OUTPUT_PROJECTIONS:
            found.append(value)
    return found


def without_sublayer(model: nn.Module, layer: int, part: str, tokens: torch.Tensor) -> torch.Tensor | None:
    """The Hugging Face forward with one sublayer's contribution removed (its output projections'
    weights and biases zeroed, then put back), or ``None`` where :func:`output_parameters` finds none.
    """
    owner, name = _layer_list(model)
    parameters = output_parameters(getattr(owner, name)[layer], part)
    if not parameters:
        return None
    saved = [value.detach().clone() for value in parameters]
    try:
        with torch.no_grad():
            for value in parameters:
                value.zero_()
            return model(tokens, use_cache=False).logits.double()
    finally:
        with torch.no_grad():
            for value, kept in zip(parameters, saved):
                value.copy_(kept)


def _kl(base: torch.Tensor, logits: torch.Tensor) -> float:
    p, q = base.double().log_softmax(-1), logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _plans(n: int) -> list[soi.LayerPlan]:
    return ([soi.LayerPlan.identity(n)] + [soi.LayerPlan.drop(n, i) for i in range(n)]
            + [soi.LayerPlan.swap(n, i) for i in range(n - 1)])


def _cell(error: BaseException) -> str:
    text = (str(error).splitlines() or [""])[0]
    return (text[:170] + " ...").replace("|", "/") if len(text) > 170 else text.replace("|", "/")


TOKENS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def prepare(label: str, workdir: Path, tokenizer: Any) -> Prepared | str:
    """Family ``label``'s checkpoint folder, the Hugging Face output and each plan's reference KL,
    or why it was not built.
    Run for every family before any Bridge exists in the process: some TransformerLens versions
    patch transformers' Gemma attention once a Bridge is built (TransformerLens issue #1795), and
    the references must be transformers' own.
    """
    prefix, extra = FAMILIES[label]
    try:
        reference = build(prefix, extra)
    except Exception as error:  # a config this transformers does not have, or other arguments
        return f"not built here ({type(error).__name__}: {_cell(error)})"
    folder = workdir / f"{prefix}-{len(os.listdir(workdir))}"
    reference.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    n = reference.config.num_hidden_layers
    base = reference_logits(reference, TOKENS, tuple(range(n)))
    expected = [(plan, _kl(base, reference_logits(reference, TOKENS, plan.order))) for plan in _plans(n)]
    for layer in range(n):
        for part, make in (("attn", soi.LayerPlan.drop_attention), ("mlp", soi.LayerPlan.drop_mlp)):
            logits = without_sublayer(reference, layer, part, TOKENS)
            if logits is not None:
                expected.append((make(n, layer), _kl(base, logits)))
    return folder, base, expected


Prepared = tuple[Path, torch.Tensor, list[tuple[soi.LayerPlan, float]]]


def _left_out_by_the_lens(model: Any) -> torch.Tensor:
    """What the lens leaves out of the output by convention (docs/lens.md): the unembedding bias
    and, where the final LayerNorm is not folded, its bias's image.
    """
    with torch.no_grad():
        out = model.b_U.detach().double() * as_seam(model).logit_scale
        bias = getattr(getattr(model, "ln_final", None), "bias", None)
        if bias is not None:
            out = out + (bias.detach().double() @ model.W_U.detach().double()) * as_seam(model).logit_scale
    return out


def row(label: str, backend: str, prepared: Prepared | str) -> str:
    """The table's row for family ``label`` on ``backend``, from what :func:`prepare` gave."""
    if isinstance(prepared, str):
        return f"| {label} | {backend} | {prepared} | |"
    folder, reference_output, expected = prepared
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = soi.load_model(folder, backend=backend)
    except ModelNotAvailableError as error:
        return f"| {label} | {backend} | refused: {_cell(error).replace(str(folder), 'FOLDER')} | |"
    except Exception as error:  # a crash: the library's bug, shown as one
        return f"| {label} | {backend} | CRASH at load: {type(error).__name__}: {_cell(error)} | |"
    moved = [str(w.message) for w in caught if "compatibility mode" in str(w.message)]
    note = ("" if not moved else "TransformerLens has no compatibility mode for it" if "has no compatibility" in moved[0]
            else "compatibility mode moves it")
    refusals: list[str] = []
    try:
        base = soi.run_plan(model, TOKENS, expected[0][0])
        found = [_kl(base, soi.run_plan(model, TOKENS, plan)) for plan, _ in expected if not plan.has_sublayers]
        try:
            found += [_kl(base, soi.run_plan(model, TOKENS, plan)) for plan, _ in expected if plan.has_sublayers]
        except ValueError as error:  # sublayer plans refused for this family
            expected = [(plan, kl) for plan, kl in expected if not plan.has_sublayers]
            refusals.append(f"; sublayer plans refused: {_cell(error)[:80]}")
    except Exception as error:
        return f"| {label} | {backend} | CRASH in a plan: {type(error).__name__}: {_cell(error)} | |"
    ordered = [e for e in expected if not e[0].has_sublayers] + [e for e in expected if e[0].has_sublayers]
    worst, lens_note = max(abs(f - e) for f, (_, e) in zip(found, ordered)), "".join(refusals)
    try:
        lens = lens_logits(model, TOKENS, convention="per_layer_norm", points=[model.cfg.n_layers])[-1]
        worst = max(worst, _kl(reference_output - _left_out_by_the_lens(model), lens))
    except NotImplementedError as error:  # the lens refuses a final norm it cannot read
        lens_note = f"; the lens refused: {_cell(error)[:90]}"
    except Exception as error:
        return f"| {label} | {backend} | CRASH in the lens: {type(error).__name__}: {_cell(error)} | |"
    largest = max(e for _, e in expected)
    seam = as_seam(model)
    fast = seam.fast_blocks(seam.embed(TOKENS), True)
    fast_text = "yes" if fast is not None and all(fast.allowed) else "no"
    status = "right" if worst <= 1e-4 else "WRONG"
    checked = {plan.kind for plan, _ in expected if plan.has_sublayers}
    unchecked = [kind for kind in ("drop_attention", "drop_mlp") if kind not in checked]
    if unchecked and not refusals:
        lens_note = f"; {' and '.join(unchecked)} not checked (no output projection found)" + lens_note
    weights = f"; raw weights ({note})" if note else ""
    return (f"| {label} | {backend} | {status}: {worst:.1e} nats (plans' KL up to {largest:.2g}){weights}{lens_note} "
            f"| {fast_text} |")


def main() -> None:
    """Print the table for the families named (default: all) on every backend installed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="labels of FAMILIES (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"TransformerLens {TL_VERSION}, transformers {tf.__version__}\n")
    print("| family | backend | status | fast path |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tokenizer = _tokenizer(workdir / "tokenizer")
        labels = args.families or list(FAMILIES)
        prepared = {label: prepare(label, workdir, tokenizer) for label in labels}  # before any Bridge
        for label in labels:
            for backend in backends_available():
                print(row(label, backend, prepared[label]), flush=True)


if __name__ == "__main__":
    main()
