"""On paper: how long the paper's robustness protocol takes on N GPUs, from the sweep's FLOP count.

    python benchmarks/paper_protocol.py [--tokens 1e6] [--tflops 52] [--load-s 30] [--gpus 1,2,4,8,16,32]

The sweep of one model with ``L`` blocks runs, per token, ``L**2`` block evaluations (prefix
sharing: the unmodified model's ``L``; a deletion of block ``i`` reruns the ``L - 1 - i`` blocks
after it; a swap of ``i, i + 1`` shares its first step with that deletion and reruns ``L - 1 - i``
more) and ``2 L`` unembeddings (every plan and the reference). One block evaluation costs
``2 (4 d**2 + 2 d d_mlp) + 4 n_ctx d`` FLOPs per token (projections, MLP, attention scores and
values over the context), one unembedding ``2 d d_vocab``. The script first checks that formula
against ``torch``'s own FLOP count of one SmolLM2-135M block and of its sweep's block count, then
prints, for each of the paper's models, the sweep's FLOPs per token and the hours for ``--tokens``
tokens per model at ``--tflops`` (sustained, per GPU), and the whole protocol's wall time on N
GPUs: the work divided over the GPUs (shards of every model's batch; never less than the largest
task) plus each GPU loading every model once (``--load-s`` per model) and the per-task overheads measured by bench_distributed.py
(``--task-s``). Architecture facts of the models are from their published configurations.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name: (blocks, d_model, d_mlp, d_vocab, n_ctx); the paper's models (PAPER.md)
MODELS = {
    "gpt2": (12, 768, 3072, 50257, 1024),
    "gpt2-medium": (24, 1024, 4096, 50257, 1024),
    "gpt2-large": (36, 1280, 5120, 50257, 1024),
    "gpt2-xl": (48, 1600, 6400, 50257, 1024),
    "pythia-410m-deduped": (24, 1024, 4096, 50304, 2048),
    "pythia-1.4b-deduped": (24, 2048, 8192, 50304, 2048),
    "pythia-2.8b-deduped": (32, 2560, 10240, 50304, 2048),
    "pythia-6.9b-deduped": (32, 4096, 16384, 50432, 2048),
    "phi-1": (24, 2048, 8192, 51200, 2048),
    "phi-1_5": (24, 2048, 8192, 51200, 2048),
    "phi-2": (32, 2560, 10240, 51200, 2048),
}


def block_flops(d: int, d_mlp: int, n_ctx: int, attention: float = 4.0, mlp_matrices: int = 2) -> float:
    """FLOPs of one block on one token: ``attention`` d x d projections' worth (Q, K, V, O), the MLP's
    ``mlp_matrices`` d x d_mlp matrices, and scores and values over ``n_ctx`` positions."""
    return 2.0 * (attention * d * d + mlp_matrices * d * d_mlp) + 4.0 * n_ctx * d


def sweep_flops_per_token(n_layers: int, d: int, d_mlp: int, d_vocab: int, n_ctx: int) -> float:
    """The prefix-sharing sweep (every deletion and adjacent swap) per token."""
    return n_layers**2 * block_flops(d, d_mlp, n_ctx) + 2 * n_layers * 2.0 * d * d_vocab


def check_against_torch() -> None:
    """The block formula against torch's FlopCounterMode on SmolLM2-135M (GQA 9/3 heads, gated MLP)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import stages_of_inference as soi

    model = soi.load_model("smollm2-135m")
    tokens = soi.load_tokens(model, n_sequences=1, seq_len=128)
    cfg = model.cfg
    kv = cfg.n_key_value_heads / cfg.n_heads
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(tokens)
    counted = (counter.get_total_flops() - 2.0 * tokens.numel() * cfg.d_model * cfg.d_vocab) / cfg.n_layers / tokens.numel()
    formula = block_flops(cfg.d_model, cfg.d_mlp, tokens.shape[1], attention=2 + 2 * kv, mlp_matrices=3)
    print(f"check: one SmolLM2 block, per token: torch counts {counted / 1e6:.3f} MFLOP, the formula gives "
          f"{formula / 1e6:.3f} MFLOP ({formula / counted - 1:+.2%}); the sweep runs L**2 = {cfg.n_layers**2} block "
          "evaluations (benchmarks/bench_sweep.py counts the same: 'blocks run: sweep 900')")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=float, default=1e6, help="tokens per model (default: %(default)g)")
    parser.add_argument("--tflops", type=float, default=52.0,
                        help="sustained fp32 TFLOP/s per GPU (default: %(default)s: 77 %% of an H100's 67 fp32 peak, "
                             "the share of the matmul rate the sweep reaches on this CPU)")
    parser.add_argument("--load-s", type=float, default=30.0, help="seconds for a GPU to load one model (default: %(default)s)")
    parser.add_argument("--task-s", type=float, default=0.05, help="overhead per task, s (default: %(default)s)")
    parser.add_argument("--shard-tokens", type=float, default=65536, help="tokens per shard (default: %(default)g)")
    parser.add_argument("--gpus", default="1,2,4,8,16,32,64")
    parser.add_argument("--no-check", action="store_true", help="skip the check against torch's FLOP count")
    args = parser.parse_args()
    if not args.no_check:
        check_against_torch()
    rate = args.tflops * 1e12
    total, largest = 0.0, 0.0
    print(f"\n{'model':22s} {'blocks':>6s} {'TFLOP/token':>12s} {'GPU-hours':>10s}  (for {args.tokens:g} tokens)")
    for name, spec in MODELS.items():
        work = sweep_flops_per_token(*spec) * args.tokens
        total += work
        largest = max(largest, sweep_flops_per_token(*spec) * min(args.tokens, args.shard_tokens))
        print(f"{name:22s} {spec[0]:6d} {sweep_flops_per_token(*spec) / 1e12:12.3f} {work / rate / 3600:10.2f}")
    n_models = len(MODELS)
    tasks = n_models * max(1, int(args.tokens // args.shard_tokens))
    print(f"all {n_models} models: {total:.3g} FLOP = {total / rate / 3600:.1f} GPU-hours at {args.tflops:g} TFLOP/s; "
          f"{tasks} tasks of {args.shard_tokens:g} tokens")
    print(f"largest task: {largest / rate / 60:.1f} min (no number of GPUs makes the protocol shorter)")
    print(f"\n{'GPUs':>5s} {'wall hours':>10s} {'speed-up':>9s}  (max(work / GPUs, largest task) + at most every model "
          "loaded once per GPU + tasks' overhead)")
    one = None
    for gpus in (int(g) for g in args.gpus.split(",")):
        wall = max(total / rate / gpus, largest / rate) + n_models * args.load_s + tasks / gpus * args.task_s
        one = one or wall
        print(f"{gpus:5d} {wall / 3600:10.2f} {one / wall:9.1f}x")


if __name__ == "__main__":
    main()
