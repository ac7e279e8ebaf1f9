"""What a distributed study costs and gains on this machine: the Ray engine's overheads and the
same study in one process, on one Ray worker and on two.

    python benchmarks/bench_distributed.py [--n-tokens 512] [--analyses robustness,neurons,...]

Prints, measured in this run:
- the overheads: starting a local Ray cluster, starting an actor and loading the model in it
  (its first call), one more round trip to the actor (scheduling alone), and, from a study's log,
  encoding, sending and storing a task's tables;
- the study's wall time in one process (the baseline: the local engine, torch on every core),
  on Ray with one worker of every core, and on Ray with one worker per core (1 thread each),
  each as a ratio to the baseline; and whether the tables agree (largest KL/loss difference).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def overheads(model: str) -> dict[str, float]:
    """Seconds to start a local cluster, start an actor with the model, and make one more call."""
    import ray

    from stages_of_inference.study.config import StudyConfig
    from stages_of_inference.study.distributed import _Worker

    out = {}
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    out["cluster start"] = time.perf_counter() - t0
    try:
        cls = ray.remote(_Worker)
        t0 = time.perf_counter()
        actor = cls.options(num_cpus=1).remote(StudyConfig(models=(model,)).to_json(), model, 1)
        identity = ray.get(actor.identity.remote())
        out["actor start + model load (first call)"] = time.perf_counter() - t0
        out["  of which the model load, in the actor"] = identity["load_seconds"]
        calls = []
        for _ in range(20):
            t0 = time.perf_counter()
            ray.get(actor.identity.remote())
            calls.append(time.perf_counter() - t0)
        out["one more call (median of 20)"] = float(np.median(calls))
    finally:
        ray.shutdown()
    return out


def timed_study(config, out: Path, **engine) -> tuple[float, object]:  # noqa: ANN001
    from stages_of_inference.study import run_study

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    study = run_study(config=config, out_dir=out, progress=False, log=None, write_report=False, **engine)
    return time.perf_counter() - t0, study


def largest_gap(a, b) -> float:  # noqa: ANN001 - two Study objects
    worst = 0.0
    for model, done in a.results.items():
        for analysis, result in done.items():
            for name, x in result.tables.items():
                y = b.results[model][analysis].tables[name]
                for column in x.columns:
                    if x[column].dtype.kind == "f" and ("kl" in column or "loss" in column):
                        worst = max(worst, float(np.nanmax(np.abs(x[column].to_numpy() - y[column].to_numpy()),
                                                           initial=0.0)))
    return worst


def main() -> None:
    from stages_of_inference.study.config import StudyConfig
    from stages_of_inference.study.distributed import RayOptions

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-tokens", type=int, default=512)
    parser.add_argument("--analyses", default="robustness,neurons,logit_lens,sharpening,task,sublayers")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{cores} cores; model {args.model}")
    for name, seconds in overheads(args.model).items():
        print(f"  {name:42s} {seconds:8.3f} s")
    config = StudyConfig(models=(args.model,), n_tokens=args.n_tokens, analyses=tuple(args.analyses.split(",")),
                         cloze_items=8, static_formats=())
    root = Path(tempfile.mkdtemp(prefix="soi-bench-"))
    try:
        base, reference = timed_study(config, root / "local")
        print(f"study ({', '.join(config.analyses)}; {args.n_tokens} tokens):")
        print(f"  one process, {cores} threads          {base:7.1f} s (baseline)")
        runs = {f"ray, 1 worker of {cores} CPUs": RayOptions(workers=1, cpus_per_worker=cores),
                f"ray, {cores} workers of 1 CPU": RayOptions(workers=cores, cpus_per_worker=1)}
        for label, options in runs.items():
            seconds, study = timed_study(config, root / label.replace(" ", "_"), engine="ray", ray_options=options)
            print(f"  {label:34s} {seconds:7.1f} s = {seconds / base:.2f}x the baseline; largest KL/loss "
                  f"difference {largest_gap(reference, study):.1e}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
