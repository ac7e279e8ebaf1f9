"""The Bridge fast path per family: the sweep on a small random model of each family whose layers
the fast path computes (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3), with the fast path and with every block run as
itself, in one run; prints each family's speed-up and the largest KL difference between the two.

    python benchmarks/bench_bridge_families.py [--d-model 256] [--layers 6] [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from stages_of_inference import robustness_sweep  # noqa: E402
from stages_of_inference._tl import TransformerBridge  # noqa: E402
from stages_of_inference.backends import as_seam  # noqa: E402

VOCAB = 512


def _tokenizer() -> tf.PreTrainedTokenizerFast:
    words = ["<bos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tempfile.mkdtemp(prefix="bench-tokenizer-")  # saved and read back: the Bridge reloads it by path
    atexit.register(shutil.rmtree, folder, True)  # ... until the benchmark ends; nothing left behind
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>").save_pretrained(folder)
    return tf.PreTrainedTokenizerFast.from_pretrained(folder)


def _model(family: str, d_model: int, layers: int) -> torch.nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=layers,
                  num_attention_heads=d_model // 64, num_key_value_heads=max(1, d_model // 128),
                  max_position_embeddings=1024)
    config, cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                   "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
                   "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM), "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}[family]
    if family == "gemma2":  # Gemma 2's soft-caps and windows (4096 on alternate layers)
        common.update(head_dim=64, sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if family == "gemma3":  # Gemma 3 270M's pattern: five sliding-window layers (window 512) to one global
        common.update(head_dim=64, sliding_window=512,
                      layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)])
    cfg = config(**common)
    cfg.architectures, cfg._attn_implementation = [cls.__name__], "eager"
    torch.manual_seed(0)
    return cls(cfg).eval()


def _timed(bridge, tokens: torch.Tensor, fast: bool, repeats: int):  # noqa: ANN001, ANN202
    best, summary = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        summary = robustness_sweep(bridge, tokens, progress=False, fast_path=fast).summary
        best = min(best, time.perf_counter() - start)
    return best, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokens = torch.randint(2, VOCAB, (args.sequences, args.tokens), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d_model {args.d_model}, {args.layers} layers, "
          f"{args.sequences} x {args.tokens} tokens, best of {args.repeats}")
    print("| family | blocks on the fast path | fast path (s) | every block as itself (s) | speed-up | "
          "largest KL difference (nats) |")
    print("|---|---|---|---|---|---|")
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"):
        bridge = TransformerBridge.boot_transformers(family, hf_model=_model(family, args.d_model, args.layers),
                                                     tokenizer=_tokenizer())
        bridge.enable_compatibility_mode()
        fast, quick = _timed(bridge, tokens, True, args.repeats)
        slow, plain = _timed(bridge, tokens, False, args.repeats)
        diff = float((quick["kl_nats"] - plain["kl_nats"]).abs().max())
        seam = as_seam(bridge)
        blocks = seam.fast_blocks(seam.embed(tokens), True)
        taken = sum(blocks.allowed) if blocks is not None else 0
        print(f"| {family} | {taken} of {args.layers} | {fast:.2f} | {slow:.2f} | {slow / fast:.2f}x | {diff:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
