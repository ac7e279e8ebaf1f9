"""The sweep on a machine whose cores are busy with other work, by thread setting.

For each competing load (0, 1 and 2 CPU-bound processes this benchmark starts and stops: a Python
busy loop each), times the same small robustness sweep of the embedded model in a fresh process
with torch's threads and OpenMP's wait policy set before torch starts:

* ``1 thread`` and ``N threads`` (N: the cores this process may use), each with OpenMP's default
  (spinning) wait policy and with ``OMP_WAIT_POLICY=PASSIVE``;
* ``library default``: what ``stages-of-inference`` sets when it starts (:func:`stages_of_inference.cli.main`:
  a passive wait policy unless one is set, threads from the cores available to the process).

Prints one table (seconds, and each against the best setting under the same load) and says whether
the library's default is within 1.5x of the best in every case. Run:
``python benchmarks/bench_busy.py`` (about five minutes on two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SWEEP = """
import json, os, sys, time
import torch
threads = int(sys.argv[1])
if threads > 0:
    torch.set_num_threads(threads)
else:  # the library's default, as the command line sets it
    from stages_of_inference.cli import default_threads
    torch.set_num_threads(default_threads())
import stages_of_inference as soi
model = soi.load_model("smollm2-135m")
tokens = soi.load_tokens(model, n_sequences=int(sys.argv[2]), seq_len=int(sys.argv[3]), seed=0)
soi.robustness_sweep(model, tokens[:1, :16], progress=False)  # warm-up
t0 = time.perf_counter()
soi.robustness_sweep(model, tokens, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
                  "wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}))
"""


def _competitors(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _run(threads: int, policy: str | None, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["HF_HUB_OFFLINE"] = "1"
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    if threads == 0:  # the library default: the command line's own start-up sets the policy
        env["SOI_BENCH_LIBRARY_DEFAULT"] = "1"
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    done = subprocess.run([sys.executable, "-c", SWEEP, str(threads), str(args.n_sequences), str(args.seq_len)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-sequences", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--loads", default="0,1,2", help="competing CPU-bound processes, comma list")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    settings = [("1 thread, spinning", 1, None), (f"{cores} threads, spinning", cores, None),
                ("1 thread, passive", 1, "PASSIVE"), (f"{cores} threads, passive", cores, "PASSIVE"),
                ("library default", 0, None)]
    print(f"cores available to this process: {cores}; sweep of {args.n_sequences} x {args.seq_len} tokens, SmolLM2-135M")
    rows = []
    for load in (int(x) for x in args.loads.split(",")):
        busy = _competitors(load)
        try:
            time.sleep(1.0)
            for label, threads, policy in settings:
                found = _run(threads, policy, args)
                rows.append({"load": load, "setting": label, **found})
                print(f"  load {load}: {label:<22} {found['seconds']:7.2f} s  (threads {found['threads']}, "
                      f"OMP_WAIT_POLICY {found['wait_policy']})", flush=True)
        finally:
            for p in busy:
                p.kill()
                p.wait()
    print("\n| competing processes | setting | threads | wait policy | seconds | against the best |")
    print("|---|---|---|---|---|---|")
    verdicts = []
    for load in sorted({r["load"] for r in rows}):
        mine = [r for r in rows if r["load"] == load]
        best = min(r["seconds"] for r in mine)
        for r in mine:
            print(f"| {load} | {r['setting']} | {r['threads']} | {r['wait_policy']} | {r['seconds']:.2f} | "
                  f"{r['seconds'] / best:.2f}x |")
        default = next(r for r in mine if r["setting"] == "library default")
        verdicts.append(default["seconds"] / best <= 1.5)
    print(f"\nlibrary default within 1.5x of the best under every load: {all(verdicts)}")


if __name__ == "__main__":
    main()
