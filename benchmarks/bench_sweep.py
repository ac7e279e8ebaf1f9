"""Benchmark of the robustness sweep: all single-block deletions and adjacent swaps of a model.

Times, in one run and on the same tokens,

(a) the library's prefix-sharing sweep (:func:`stages_of_inference.robustness_sweep`), ``--repeat``
    times, and the same sweep with ``fast_path=False`` (every block through TransformerLens' own
    module);
(b) the obvious TransformerLens loop: the baseline once, one ``run_with_hooks`` per deletion
    (zeroing ``hook_attn_out`` / ``hook_mlp_out``), one forward with reordered blocks per swap,
    metrics from the logits with :func:`stages_of_inference.metrics.sequence_metrics`;
(c) the authors' procedure: the baseline recomputed for every intervention, deletions by hooks,
    swaps by exchanging the two blocks' weights in the state dict and rebuilding the model;

checks that the three agree (KL, loss, accuracy), and prints the speed-up ratios (with the median
sweep), the achieved GFLOP/s of each against a measured fp32 matmul rate (the machine's peak: the
best of the single products measured before and after the timed runs and of the sustained rates
below; the sweep's best run is also put against it, best against best), each sweep's also against
the rate sustained over 5 s just
before and just after it (what a run gets on a machine whose speed drifts), and the peak
memory of the (first) sweep against one forward pass with its metrics
(resident-set high-water mark, ``/proc/self/status`` ``VmHWM``, reset through
``/proc/self/clear_refs`` before each measurement, after ``malloc_trim``).

Run: ``python benchmarks/bench_sweep.py --n-sequences 4 --seq-len 128``
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformer_lens import HookedTransformer

import stages_of_inference as soi
from stages_of_inference.interventions.executor import block_count
from stages_of_inference.interventions.hooks import drop_layer
from stages_of_inference.metrics import sequence_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.authors
from tests.authors import weight_swapped  # noqa: E402


# --------------------------------------------------------------------------- memory
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class PeakRSS:
    """Peak resident memory of a block, above the resident memory at its start (Linux only)."""

    def __enter__(self) -> PeakRSS:
        _trim()
        self.start = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak = _status("VmHWM")
        self.increment = self.peak - self.start


# --------------------------------------------------------------------------- helpers
def matmul_gflops(dtype: torch.dtype = torch.float32) -> float:
    """Best measured matmul rate of ``dtype`` over a few shapes (square, and the unembedding's)."""
    best = 0.0
    shapes = [(2048, 2048, 2048), (512, 576, 49152), (512, 576, 1536)]
    with torch.inference_mode():
        for m, k, n in shapes:
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            a @ b
            for _ in range(5):
                t = time.perf_counter()
                a @ b
                best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def sustained_matmul_gflops(seconds: float = 5.0) -> float:
    """fp32 matmul rate sustained over ``seconds``: 2048^3 products back to back, total FLOPs over
    total time. The best single product (:func:`matmul_gflops`) is the machine's peak; on a
    shared machine whose speed drifts, this rate is what a run of that length actually gets."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    with torch.inference_mode():
        a @ b
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            n += 1
        return 2 * 2048**3 * n / (time.perf_counter() - start) / 1e9


def forward_flops(model: HookedTransformer, tokens: torch.Tensor) -> tuple[float, float]:
    """(FLOPs of one forward pass, FLOPs of its unembedding), counted by torch's FlopCounterMode."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(tokens)
    total = float(counter.get_total_flops())
    unembed = 2.0 * tokens.numel() * model.cfg.d_model * model.cfg.d_vocab
    return total, unembed


def means(logits: torch.Tensor, base: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    m = sequence_metrics(logits, tokens, ref_logits=base)
    return {"kl_nats": float(m["kl_nats"].double().mean()), "loss": float(m["loss"].double().mean()),
            "accuracy": float(m["correct"].double().mean())}


def obvious_loop(model: HookedTransformer, tokens: torch.Tensor) -> dict[tuple[str, int], dict[str, float]]:
    n = model.cfg.n_layers
    out = {}
    with torch.inference_mode():
        base = model(tokens)
        for i in range(n):
            out[("drop", i)] = means(model.run_with_hooks(tokens, fwd_hooks=drop_layer(model, i)), base, tokens)
        for i in range(n - 1):
            with soi.reordered(model, soi.LayerPlan.swap(n, i)):
                out[("swap", i)] = means(model(tokens), base, tokens)
    return out


def authors_procedure(model: HookedTransformer, tokens: torch.Tensor) -> dict[tuple[str, int], dict[str, float]]:
    n = model.cfg.n_layers
    out = {}
    with torch.inference_mode():
        for i in range(n):
            base = model(tokens)
            out[("drop", i)] = means(model.run_with_hooks(tokens, fwd_hooks=drop_layer(model, i)), base, tokens)
        for i in range(n - 1):
            base = model(tokens)
            with torch.inference_mode(False):
                swapped = weight_swapped(model, i)
            out[("swap", i)] = means(swapped(tokens), base, tokens)
            del swapped
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-sequences", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--stack-tokens", type=int, default=None,
                        help="the sweep's stack_tokens (default: the library's default for the device)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="times the sweep (a) is run: the median for the speed-ups, the best for the FLOP rate")
    parser.add_argument("--skip-authors", action="store_true", help="skip (c), the slowest")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp32: the comparison with the loop and the authors' procedure (above); bf16 or fp16: "
                             "that precision's sweep against the fp32 sweep, measured in the same run (run_precision)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = soi.load_model(args.model)
    tokens = soi.load_tokens(model, corpus="default", n_sequences=args.n_sequences, seq_len=args.seq_len, seed=0)
    if args.precision == "fp32":
        run(model, tokens, args)
    else:
        run_precision(model, tokens, args)


_CATEGORIES = {
    "matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                  "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention"),
    "metric passes (exp, sums, max)": ("aten::exp", "aten::sum", "aten::amax", "aten::max", "aten::sub_", "aten::sub",
                                       "aten::maximum", "aten::clamp_min_", "aten::mul_", "aten::log", "aten::gather",
                                       "aten::argmax"),
    "dtype casts and copies": ("aten::copy_", "aten::_to_copy", "aten::cat"),
}


def product_seconds(model: HookedTransformer, tokens: torch.Tensor, block_flops: float, unembed_flops: float,
                    dtype: torch.dtype, rows: int) -> float:
    """Seconds the sweep's matrix products alone would take in ``dtype`` at the rates measured here
    for their own shapes: a block's four products (fused query/key/value, output, the MLP's in and
    out, ``rows`` rows, the sweep's stack) and an unembedding block (the scored rows of the batch
    times :data:`~stages_of_inference.interventions.unembed.UNEMBED_BLOCK` columns), each the best
    of five timed runs.
    """
    from stages_of_inference.interventions.unembed import UNEMBED_BLOCK

    cfg = model.cfg
    d, heads = cfg.d_model, cfg.n_heads * cfg.d_head
    kv = (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * cfg.d_head
    mlp_in = cfg.d_mlp * (2 if getattr(cfg, "gated_mlp", False) else 1)
    block = [(rows, d, heads + 2 * kv), (rows, heads, d), (rows, d, mlp_in), (rows, cfg.d_mlp, d)]
    scored = tokens.shape[0] * (tokens.shape[1] - 2)

    def seconds(shapes: list[tuple[int, int, int]]) -> float:
        total = 0.0
        with torch.inference_mode():
            for m, k, n in shapes:
                a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
                out = torch.empty(m, n, dtype=dtype)
                torch.mm(a, b, out=out)
                best = float("inf")
                for _ in range(5):
                    t = time.perf_counter()
                    torch.mm(a, b, out=out)
                    best = min(best, time.perf_counter() - t)
                total += best
        return total

    block_rate = sum(2 * m * k * n for m, k, n in block) / seconds(block)
    unembed_rate = 2 * scored * d * UNEMBED_BLOCK / seconds([(scored, d, UNEMBED_BLOCK)])
    return block_flops / block_rate + unembed_flops / unembed_rate


def _where_time_goes(model: HookedTransformer, tokens: torch.Tensor, precision: str) -> dict[str, float]:
    """Self CPU time per category of operator in one sweep (torch.profiler), in seconds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        soi.robustness_sweep(model, tokens, progress=False, precision=precision, check_sequences=0)
    spent = {name: 0.0 for name in (*_CATEGORIES, "everything else")}
    for event in prof.key_averages():
        kind = next((k for k, ops in _CATEGORIES.items() if event.key in ops), "everything else")
        spent[kind] += event.self_cpu_time_total / 1e6
    return spent


def run_precision(model: HookedTransformer, tokens: torch.Tensor, args: argparse.Namespace) -> None:
    """The low-precision sweep against the fp32 sweep, in one run: times (alternated, medians),
    FLOP rates against each dtype's measured matmul rate, the bound of Amdahl's law (the products at
    the rates their own shapes reach now, the rest as long as in the fp32 sweep:
    :func:`product_seconds`), where the time goes (the profiler's view), and the deviations of
    every plan (and what the sweep's own precision check saw)."""
    from stages_of_inference.interventions.deviation import rank_correlation

    low = args.precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[low]
    n = model.cfg.n_layers
    print(f"model {args.model}: {n} blocks; tokens {tuple(tokens.shape)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
          f"load average {os.getloadavg()}")
    f_fwd, f_unembed = forward_flops(model, tokens)
    plans = [soi.LayerPlan.drop(n, i) for i in range(n)] + [soi.LayerPlan.swap(n, i) for i in range(n - 1)]
    flops = block_count(plans) * (f_fwd - f_unembed) / n + (len(plans) + 1) * f_unembed * (tokens.shape[1] - 2) / tokens.shape[1]
    rates = {"fp32": matmul_gflops(torch.float32), low: matmul_gflops(dtype)}
    times: dict[str, list[float]] = {"fp32": [], low: []}
    results = {}
    for _ in range(args.repeat):
        for precision in times:  # the low-precision sweep alone here; its own check is timed below
            t = time.perf_counter()
            results[precision] = soi.robustness_sweep(model, tokens, progress=False, batch_size=args.batch_size,
                                                      chunk_tokens=args.chunk_tokens, stack_tokens=args.stack_tokens,
                                                      precision=precision, check_sequences=0)
            times[precision].append(time.perf_counter() - t)
    rates = {p: max(r, matmul_gflops(torch.float32 if p == "fp32" else dtype)) for p, r in rates.items()}
    med = {p: statistics.median(v) for p, v in times.items()}
    print(f"sweep ({len(plans)} plans, {flops / 1e9:.0f} GFLOP), median of {args.repeat} runs each, alternated:")
    for p in times:
        rate = flops / med[p] / 1e9
        print(f"  {p:5s} {med[p]:7.1f} s ({', '.join(f'{x:.1f}' for x in times[p])}) = {rate:6.1f} GFLOP/s: "
              f"{100 * rate / rates[p]:.0f} % of the measured {p} matmul rate ({rates[p]:.1f} GFLOP/s)")
    print(f"  {low} / fp32 speed-up {med['fp32'] / med[low]:.2f}x; the matmul rates' ratio on this machine "
          f"{rates[low] / rates['fp32']:.2f}x (the bound for a sweep made only of products): "
          f"{100 * med['fp32'] / med[low] / (rates[low] / rates['fp32']):.0f} % of it")
    # Amdahl: the products at their own shapes' rates, everything else (which the precision keeps in
    # fp32: the residual stream, the norms, the metrics over the vocabulary; and the attention, no
    # faster in bf16 on a CPU) as long as it takes in the fp32 sweep
    rows = args.stack_tokens or 1024
    block_flops = block_count(plans) * (f_fwd - f_unembed) / n
    unembed_flops = (len(plans) + 1) * f_unembed * (tokens.shape[1] - 2) / tokens.shape[1]
    products = {p: product_seconds(model, tokens, block_flops, unembed_flops,
                                   torch.float32 if p == "fp32" else dtype, rows) for p in times}
    rest = med["fp32"] - products["fp32"]
    amdahl = med["fp32"] / (products[low] + rest)
    print(f"  the products alone, at the rates of their own shapes measured now: fp32 {products['fp32']:.1f} s, {low} "
          f"{products[low]:.1f} s; the rest of the fp32 sweep {rest:.1f} s, of the {low} sweep {med[low] - products[low]:.1f} s")
    print(f"  bound with the rest kept as in fp32 (Amdahl): {amdahl:.2f}x; the {low} sweep reaches "
          f"{100 * med['fp32'] / med[low] / amdahl:.0f} % of it")
    t = time.perf_counter()
    results["checked"] = soi.robustness_sweep(model, tokens, progress=False, batch_size=args.batch_size,
                                              chunk_tokens=args.chunk_tokens, stack_tokens=args.stack_tokens,
                                              precision=low)
    checked = time.perf_counter() - t
    print(f"  with its precision check (the default: a few plans re-run in fp32 on the first sequence): {checked:.1f} s, "
          f"{med['fp32'] / checked:.2f}x faster than fp32")
    for p in times:
        spent = _where_time_goes(model, tokens, p)
        total = sum(spent.values())
        print(f"  where the {p} time goes (profiled run, self CPU time): "
              + ", ".join(f"{k} {100 * v / total:.0f} %" for k, v in spent.items()))
    a, b = results["fp32"].summary, results[low].summary
    damaged = a["kind"] != "none"
    dev = (b["kl_nats"] - a["kl_nats"]).abs()
    print(f"deviation of {low} from fp32 over the {int(damaged.sum())} plans: KL median relative "
          f"{100 * (dev / a['kl_nats'])[damaged].median():.2f} %, largest {dev.max():.4f} nats, rank correlation "
          f"{rank_correlation(b['kl_nats'][damaged], a['kl_nats'][damaged]):.4f}; loss largest "
          f"{(b['loss'] - a['loss']).abs().max():.4f} nats; accuracy largest {(b['accuracy'] - a['accuracy']).abs().max():.4f}; "
          f"top-5 most damaging plans kept: {list(a.nlargest(5, 'kl_nats').index) == list(b.nlargest(5, 'kl_nats').index)}")
    check = results["checked"].provenance["precision_check"]
    print(f"the sweep's own check ({check['n_plans']} plans on {check['n_sequences']} sequences): KL median relative "
          f"{100 * check['kl_median_rel']:.2f} %, largest {check['kl_max_abs']:.4f} nats, rank correlation "
          f"{check['kl_rank_correlation']:.4f}; stands: {check['stands']}")
    print(f"load average at the end {os.getloadavg()}")


def run(model: HookedTransformer, tokens: torch.Tensor, args: argparse.Namespace) -> None:
    """Time (a), (b), (c) on ``model`` and ``tokens`` and print the report."""
    n = model.cfg.n_layers
    print(f"model {args.model}: {n} blocks, d_model {model.cfg.d_model}, vocab {model.cfg.d_vocab}; "
          f"tokens {tuple(tokens.shape)}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); load average {os.getloadavg()}")

    peak_rate = matmul_gflops()
    f_fwd, f_unembed = forward_flops(model, tokens)
    f_block = (f_fwd - f_unembed) / n
    plans = [soi.LayerPlan.drop(n, i) for i in range(n)] + [soi.LayerPlan.swap(n, i) for i in range(n - 1)]
    n_plans = len(plans)
    scored = (tokens.shape[1] - 2) / tokens.shape[1]
    flops = {
        "sweep": block_count(plans) * f_block + (n_plans + 1) * f_unembed * scored,
        "no-fast": block_count(plans) * f_block + (n_plans + 1) * f_unembed * scored,
        "obvious": (n_plans + 1) * f_fwd,
        "authors": 2 * n_plans * f_fwd,
    }
    print(f"fp32 matmul rate (best measured): {peak_rate:.1f} GFLOP/s; one forward {f_fwd / 1e9:.1f} GFLOP "
          f"(unembedding {f_unembed / 1e9:.1f}); blocks run: sweep {block_count(plans)}, "
          f"obvious {(n_plans + 1) * n}, authors {2 * n_plans * n}")

    # one forward pass with its metrics: the memory yardstick
    with torch.inference_mode():
        model(tokens)  # warm-up
        with PeakRSS() as one:
            logits = model(tokens)
            sequence_metrics(logits, tokens, ref_logits=logits)
            del logits

    times: dict[str, float] = {}
    sweep_times: list[float] = []
    sustained: list[float] = []  # the better of the sustained rates just before and just after each sweep
    for k in range(args.repeat):
        before = sustained_matmul_gflops()
        with PeakRSS() as peak:
            t = time.perf_counter()
            result = soi.robustness_sweep(model, tokens, progress=False, batch_size=args.batch_size,
                                          chunk_tokens=args.chunk_tokens, stack_tokens=args.stack_tokens)
            sweep_times.append(time.perf_counter() - t)
        sustained.append(max(before, sustained_matmul_gflops()))
        if k == 0:
            sweep, mem = result, peak
    # speed-ups use the median sweep (the other methods run once)
    times["sweep"] = statistics.median(sweep_times)
    print(f"(a) sweep:   {times['sweep']:8.1f} s (median of {len(sweep_times)}: "
          + ", ".join(f"{x:.1f}" for x in sweep_times) + ")", flush=True)
    t = time.perf_counter()
    slow = soi.robustness_sweep(model, tokens, progress=False, batch_size=args.batch_size,
                                chunk_tokens=args.chunk_tokens, fast_path=False, stack_tokens=args.stack_tokens)
    times["no-fast"] = time.perf_counter() - t
    print(f"(a') sweep, fast_path=False: {times['no-fast']:8.1f} s", flush=True)
    t = time.perf_counter()
    obvious = obvious_loop(model, tokens)
    times["obvious"] = time.perf_counter() - t
    print(f"(b) obvious: {times['obvious']:8.1f} s", flush=True)
    authors = None
    if not args.skip_authors:
        t = time.perf_counter()
        authors = authors_procedure(model, tokens)
        times["authors"] = time.perf_counter() - t
        print(f"(c) authors: {times['authors']:8.1f} s", flush=True)

    after = matmul_gflops()
    best = max(peak_rate, after, *sustained)
    print(f"fp32 matmul rate measured again after the runs: {after:.1f} GFLOP/s; using the best of every "
          f"matmul rate measured (these two and the sustained rates), {best:.1f}")
    peak_rate = best
    s = sweep.summary
    cols = ["kl_nats", "loss", "accuracy"]
    fast_vs_slow = float((s[cols] - slow.summary[cols]).abs().to_numpy().max())
    worst = {"obvious": 0.0, "authors": 0.0}
    for row in s[s["kind"] != "none"].itertuples():
        key = (row.kind, int(row.layer))
        for name, other in (("obvious", obvious), ("authors", authors)):
            if other is None:
                continue
            for metric in ("kl_nats", "loss", "accuracy"):
                worst[name] = max(worst[name], abs(getattr(row, metric) - other[key][metric]))
    print()
    print(f"agreement (max abs diff of KL, loss, accuracy over {n_plans} interventions): "
          f"sweep vs obvious {worst['obvious']:.2e}, sweep vs authors "
          + (f"{worst['authors']:.2e}" if authors is not None else "skipped")
          + f"; sweep vs sweep with fast_path=False {fast_vs_slow:.2e}")
    print(f"speed-up: obvious / sweep = {times['obvious'] / times['sweep']:.2f}x"
          + (f", authors / sweep = {times['authors'] / times['sweep']:.2f}x" if authors is not None else "")
          + f"; the fast path's share: sweep without it / with it = {times['no-fast'] / times['sweep']:.2f}x")
    for name, seconds in times.items():
        rate = flops[name] / seconds / 1e9
        print(f"  {name:8s} {flops[name] / 1e9:8.0f} GFLOP in {seconds:7.1f} s = {rate:6.1f} GFLOP/s "
              f"({100 * rate / peak_rate:4.0f} % of the matmul rate)")
    best_rate = flops["sweep"] / min(sweep_times) / 1e9
    print(f"  the best sweep, {min(sweep_times):.1f} s = {best_rate:.1f} GFLOP/s: {100 * best_rate / peak_rate:.0f} % "
          f"of the best matmul rate ({peak_rate:.1f}), best against best")
    against = [100 * flops["sweep"] / seconds / 1e9 / rate for seconds, rate in zip(sweep_times, sustained)]
    print("  each sweep against the matmul rate sustained over 5 s just before and just after it (the better "
          "of the two): " + ", ".join(f"{a:.0f} % of {r:.1f}" for a, r in zip(against, sustained))
          + f"; median {statistics.median(against):.0f} %")
    print(f"memory (peak RSS above the start, model resident): one forward + metrics {one.increment / 2**20:.0f} MiB; "
          f"{n_plans}-plan sweep {mem.increment / 2**20:.0f} MiB = {mem.increment / one.increment:.2f}x; "
          f"process peak {one.peak / 2**20:.0f} vs {mem.peak / 2**20:.0f} MiB")
    d0 = s[(s["kind"] == "drop") & (s["layer"] == 0)].iloc[0]
    print(f"sanity: original loss {s.iloc[0]['loss']:.3f}, accuracy {s.iloc[0]['accuracy']:.3f}; "
          f"drop 0: loss_delta {d0['loss_delta']:.2f}, KL {d0['kl_nats']:.2f}")
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
