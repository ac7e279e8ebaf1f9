"""The GPU check: on a CUDA machine, in about five minutes, everything the library claims there.

1. the tests marked ``gpu`` (``tests/test_gpu.py``: the sweep against the authors' methods on the
   real model on ``cuda`` in fp32 and bf16, the bf16 deviation targets, memory flat in the number
   of plans);
2. per dtype (fp32, bf16): the device's matmul rate (the best of a few products, timed with
   synchronisation), and the drop-and-swap sweep of the embedded model: its time, tokens/s, and
   model FLOP utilisation against that rate (the sweep's FLOPs: blocks run by the trie times one
   block's FLOPs, plus one unembedding per plan, counted by torch's FlopCounterMode);
3. the default study's time (``stages-of-inference run``'s settings, on ``cuda``).

Run: ``python benchmarks/gpu_check.py`` (``--device cpu --skip-tests --skip-study`` runs parts 2
on a CPU, as the test suite does to keep this script working).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import stages_of_inference as soi
from stages_of_inference.interventions.executor import block_count

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """Best measured matmul rate (GFLOP/s) of ``dtype`` on ``device`` over a few shapes."""
    big, rows = (8192, 4096) if device.startswith("cuda") else (1024, 512)
    best = 0.0
    with torch.inference_mode():
        for m, k, n in ((big, big, big), (rows, 576, 49152), (rows, 576, 1536)):
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            a @ b
            for _ in range(5):
                _sync(device)
                t = time.perf_counter()
                a @ b
                _sync(device)
                best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def sweep_flops(model, tokens: torch.Tensor) -> float:
    """FLOPs of the drop-and-swap sweep: the trie's block runs and one unembedding per plan."""
    n = model.cfg.n_layers
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(tokens)
    total = float(counter.get_total_flops())
    unembed = 2.0 * tokens.numel() * model.cfg.d_model * model.cfg.d_vocab
    plans = [soi.LayerPlan.drop(n, i) for i in range(n)] + [soi.LayerPlan.swap(n, i) for i in range(n - 1)]
    scored = (tokens.shape[1] - 2) / tokens.shape[1]
    return block_count(plans) * (total - unembed) / n + (len(plans) + 1) * unembed * scored


def time_sweeps(model, tokens: torch.Tensor, device: str, repeat: int) -> dict[str, float]:
    """Median seconds of the sweep per precision, the precisions alternated run by run."""
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for precision in times:  # warm-up (kernels, allocator)
        soi.robustness_sweep(model, tokens[:2], progress=False, precision=precision, check_sequences=0)
    for _ in range(repeat):
        for precision in times:
            _sync(device)
            t = time.perf_counter()
            soi.robustness_sweep(model, tokens, progress=False, precision=precision, check_sequences=0)
            _sync(device)
            times[precision].append(time.perf_counter() - t)
    return {p: statistics.median(v) for p, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n-sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-study", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run it on a machine with one (or --device cpu for a smoke run)")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {args.device} ({name}); torch {torch.__version__}, stages_of_inference {soi.__version__}", flush=True)

    if not args.skip_tests:
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                               "tests/test_gpu.py"], cwd=ROOT, timeout=240)
        print(f"gpu tests: exit {done.returncode} in {time.perf_counter() - t:.0f} s", flush=True)

    model = soi.load_model("smollm2-135m", device=args.device)
    tokens = soi.load_tokens(model, corpus="default", n_sequences=args.n_sequences, seq_len=args.seq_len, seed=0)
    flops = sweep_flops(model, tokens)
    rates = {"fp32": matmul_rate(args.device, torch.float32), "bf16": matmul_rate(args.device, torch.bfloat16)}
    seconds = time_sweeps(model, tokens, args.device, args.repeat)
    print(f"sweep of {tokens.shape[0]} x {tokens.shape[1]} tokens, 59 plans, {flops / 1e12:.2f} TFLOP:")
    for precision, s in seconds.items():
        rate = flops / s / 1e9
        print(f"  {precision}: {s:.2f} s, {tokens.numel() / s:.0f} tokens/s, {rate:.0f} GFLOP/s = "
              f"{100 * rate / rates[precision]:.0f} % of the measured {precision} matmul rate ({rates[precision]:.0f})")
    print(f"  bf16 / fp32 sweep speed-up {seconds['fp32'] / seconds['bf16']:.2f}x; "
          f"matmul rate ratio {rates['bf16'] / rates['fp32']:.2f}x", flush=True)

    if not args.skip_study:
        from stages_of_inference.study import StudyConfig, run_study

        for precision in ("fp32", "bf16"):
            with tempfile.TemporaryDirectory() as out:
                t = time.perf_counter()
                run_study(config=StudyConfig(device=args.device, precision=precision), out_dir=out, progress=False,
                          log=None)
                print(f"default study ({precision}): {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
