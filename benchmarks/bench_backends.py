"""Benchmark of the sweep on the two backends: the same plans on the same tokens through
TransformerLens' ``HookedTransformer`` (the fast path and plan stacking) and through its
``TransformerBridge`` (its fast path for Llama-style layers, and every block run as itself), in one
run; prints each time, the ratios, and the largest difference of KL and loss between them.

Needs TransformerLens 3.9 (the only version with both). Run:
``python benchmarks/bench_backends.py --n-sequences 2 --seq-len 128``
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-sequences", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import stages_of_inference as soi
    from stages_of_inference._tl import HAS_HOOKED, TL_VERSION
    from stages_of_inference.interventions.executor import evaluate_plans

    if not HAS_HOOKED:
        raise SystemExit(f"TransformerLens {TL_VERSION} has no HookedTransformer: run this in .venv (3.9)")
    hooked = soi.load_model(args.model, backend="hooked")
    bridge = soi.load_model(args.model, backend="bridge")
    tokens = soi.load_tokens(hooked, corpus="default", n_sequences=args.n_sequences, seq_len=args.seq_len, seed=0)
    n = hooked.cfg.n_layers
    plans = [soi.LayerPlan.identity(n)] + [soi.LayerPlan.drop(n, i) for i in range(n)] + \
        [soi.LayerPlan.swap(n, i) for i in range(n - 1)]
    print(f"{args.model}: {len(plans)} plans on {args.n_sequences} x {args.seq_len} tokens; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, TransformerLens {TL_VERSION}")
    times, tables = {}, {}
    runs = (("hooked", hooked, True), ("bridge", bridge, True), ("bridge blocks", bridge, False),
            ("hooked again", hooked, True))
    for name, model, fast in runs:
        t0 = time.perf_counter()
        tables[name] = evaluate_plans(model, tokens, plans, progress=False, fast_path=fast)
        times[name] = time.perf_counter() - t0
        print(f"  {name:13s} {times[name]:7.1f} s")
    base = min(times["hooked"], times["hooked again"])
    print(f"bridge / hooked (best of two): {times['bridge'] / base:.2f}x the time; "
          f"bridge with every block run as itself: {times['bridge blocks'] / base:.2f}x")
    for name in ("bridge", "bridge blocks"):
        for column in ("kl_nats", "loss"):
            diff = float((tables[name][column] - tables["hooked"][column]).abs().max())
            print(f"largest |{name} - hooked| {column}: {diff:.2e}")


if __name__ == "__main__":
    main()
