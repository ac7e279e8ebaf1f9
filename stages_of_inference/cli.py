"""The ``stages-of-inference`` command line.

Commands:

* ``run``: the main job, the whole study (:func:`stages_of_inference.study.run_study`) on one or
  more models; writes ``report.html`` and the data files into ``--out-dir``; with ``--ray`` on a
  Ray cluster, with ``--shard I/N`` one shard of it (task results only);
* ``merge``: the task results of ``--shard`` runs, merged into one study and its report;
* ``sweep``: the deletion / swap robustness sweep alone, printed (and saved with ``--out``);
* ``neurons``: prediction and suppression neurons per layer (the weights alone, no text);
* ``lens``: the logit-lens trajectory in one or both conventions;
* ``models``: the known models, which are installed, how to get the rest.

Exit codes: 0 done; 2 a bad argument or input (one readable line on stderr); 3 a model that
cannot be had here (not installed, hub unreachable) or a Ray head that does not answer; 4
``--out-dir`` holds a study made with other settings and ``--on-mismatch error`` was given; 5 a
task of a distributed study failed (its worker died too often, or it raised); 6 a file could not be
written (a full disk, a read-only folder: one line naming the file; nothing half-written is left,
and the same command run again after freeing space resumes); 130 interrupted (Ctrl-C; ``run`` resumes from
where it stopped when started again with the same ``--out-dir``). Anything else is a bug and
prints a traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from stages_of_inference._checks import BACKEND_CHOICES, PRECISIONS
from stages_of_inference.study.options import add_options, positive

__all__ = ["DEFAULT_MODEL", "default_threads", "EXIT_INTERRUPTED", "EXIT_MISMATCH", "EXIT_OK", "EXIT_TASK_FAILED", "EXIT_UNAVAILABLE",
    "EXIT_WRITE",
    "EXIT_USAGE",
    "build_parser", "main"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_MISMATCH = 4
EXIT_TASK_FAILED = 5
EXIT_WRITE = 6
EXIT_INTERRUPTED = 130

DEFAULT_MODEL = "smollm2-135m"


def _preflight(args: argparse.Namespace, corpus: str | None = None, out: str | None = None,
               out_dir: str | Path | None = None) -> None:
    """Every check that needs no model, before one loads: the device, where results go, the
    corpus (a dataset name is only readable where the hub answers: asked now, in bounded time).
    """
    from stages_of_inference._checks import check_device, check_output_path

    check_device(getattr(args, "device", None) or getattr(args, "config_device", None))
    if out:
        check_output_path(out, "--out file")
    if out_dir is not None:
        check_output_path(out_dir, "--out-dir folder")
    if corpus is not None:
        from stages_of_inference.data import check_corpus

        check_corpus(corpus)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own bars (loading weights) too


def _load(args: argparse.Namespace, n_tokens: int | None = None):  # noqa: ANN202 - returns (model, tokens)
    import stages_of_inference as soi

    if n_tokens is not None and n_tokens < 2 * args.seq_len:
        raise ValueError(f"--n-tokens must be at least two sequences of --seq-len {args.seq_len} ({2 * args.seq_len})")
    _preflight(args, corpus=args.corpus if n_tokens is not None else None, out=getattr(args, "out", None))
    model = soi.load_model(args.model, device=args.device, backend=getattr(args, "backend", "auto"))
    if n_tokens is None:
        return model, None
    tokens = soi.load_tokens(model, args.corpus, n_sequences=n_tokens // args.seq_len, seq_len=args.seq_len,
                             seed=args.seed)
    return model, tokens


def _save(table, out: str | None) -> None:  # noqa: ANN001 - a DataFrame with provenance
    if not out:
        return
    from stages_of_inference.results import save_table

    path = Path(out)
    fmt = "csv" if path.suffix == ".csv" else "parquet"
    written = save_table(table, path, fmt)
    print(f"saved {written} (+ {written.name}.json provenance)")


def _print_table(table, columns: Sequence[str], formats: dict[str, str]) -> None:  # noqa: ANN001
    shown = table[[c for c in columns if c in table.columns]]
    print(shown.to_string(index=False, formatters={c: (lambda f: (lambda v: format(v, f)))(f) for c, f in formats.items()
                                                   if c in shown.columns}))


# --------------------------------------------------------------------------------------------
# commands


def _run(args: argparse.Namespace) -> int:
    from stages_of_inference.study import run_study
    from stages_of_inference.study.config import from_args

    config = from_args(args)
    listed = list(args.config_analyses or ())
    twice = sorted({a for a in listed if listed.count(a) > 1})
    if twice:
        print(f"note: analyses listed more than once run once: {', '.join(twice)}")
    models = config.models
    if args.ray is not None and args.shard is not None:
        raise ValueError("--ray and --shard are two ways to split a study: give one")
    given = [flag for flag, value, default in (("--workers", args.workers, None), ("--shards", args.shards, None),
                                               ("--cpus-per-worker", args.cpus_per_worker, 1.0),
                                               ("--gpus-per-worker", args.gpus_per_worker, None),
                                               ("--max-retries", args.max_retries, 2)) if value != default]
    if given and args.ray is None:
        raise ValueError(f"{', '.join(given)} set how a study runs on Ray: add --ray [ADDRESS]")
    out_dir = Path(args.out_dir) if args.out_dir else Path("reports") / "+".join(
        "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(m).name) for m in models)
    _preflight(args, corpus=config.corpus, out_dir=out_dir)
    started = time.perf_counter()
    if args.shard is not None:
        from stages_of_inference.study.sharded import parse_shard, run_shard

        shard, n_shards = parse_shard(args.shard)
        run_shard(config, shard, n_shards, out_dir, progress=not args.quiet, log=print, adopt_folder=args.adopt_folder)
        print(f"shard done in {time.perf_counter() - started:.0f} s")
        return EXIT_OK
    engine = {} if args.ray is None else {"engine": "ray", "ray_address": None if args.ray == LOCAL_RAY else args.ray,
                                          "ray_options": _ray_options(args)}
    study = run_study(config=config, out_dir=out_dir, on_mismatch=args.on_mismatch, progress=not args.quiet,
                      log=print, adopt_folder=args.adopt_folder, **engine)
    print(f"done in {time.perf_counter() - started:.0f} s; open {study.report.resolve()} in a browser")
    return EXIT_OK


LOCAL_RAY = "local"
"""``--ray`` with no address: a local Ray cluster on this machine's cores."""


def _ray_options(args: argparse.Namespace):  # noqa: ANN202 - a RayOptions
    from stages_of_inference.study.distributed import RayOptions

    return RayOptions(workers=args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                      shards=args.shards, max_retries=args.max_retries)


def _merge(args: argparse.Namespace) -> int:
    from stages_of_inference.study.sharded import merge_studies

    _preflight(args, out_dir=args.out_dir)
    study = merge_studies(args.folders, args.out_dir, log=print, adopt_folder=args.adopt_folder)
    print(f"open {study.report.resolve()} in a browser")
    return EXIT_OK


def _sweep(args: argparse.Namespace) -> int:
    import stages_of_inference as soi
    from stages_of_inference.interventions.deviation import PrecisionCheck
    from stages_of_inference.robustness import check_kinds

    kinds = check_kinds(tuple(k.strip() for k in args.kinds.split(",") if k.strip()))
    model, tokens = _load(args, args.n_tokens)
    result = soi.robustness_sweep(model, tokens, kinds=kinds, progress=not args.quiet, batch_size=args.batch_size,
                                  precision=args.precision)
    summary = result.summary
    ref = summary[summary["kind"] == "none"].iloc[0]
    print(f"{args.model}: {model.cfg.n_layers} blocks; {tokens.shape[0]} x {tokens.shape[1]} tokens of {args.corpus!r}, "
          f"{int(ref['n_tokens'])} scored; loss {ref['loss']:.3f} nats, top-1 accuracy {100 * ref['accuracy']:.1f} %")
    _print_table(summary[summary["kind"] != "none"],
                 ["kind", "layer", "relative_depth", "kl_nats", "loss_delta", "relative_accuracy", "top1_agreement"],
                 {"relative_depth": ".2f", "kl_nats": ".3f", "loss_delta": "+.3f", "relative_accuracy": ".3f",
                  "top1_agreement": ".3f"})
    if "precision_check" in result.provenance:
        print(PrecisionCheck(result["precision_check"], result.provenance["precision_check"]).sentence)
    _save(summary, args.out)
    return EXIT_OK


def _neurons(args: argparse.Namespace) -> int:
    from stages_of_inference.stages.prediction_ensembling import neuron_counts, neuron_moments

    model, _ = _load(args)
    moments = neuron_moments(model, args.threshold, progress=not args.quiet)
    counts = neuron_counts(moments, n_layers=model.cfg.n_layers)
    print(f"{args.model}: {int(counts['n_prediction'].sum())} prediction and {int(counts['n_suppression'].sum())} "
          f"suppression neurons of {int(counts['n_neurons'].sum())} (kurtosis > {args.threshold:g})")
    _print_table(counts, ["layer", "relative_depth", "n_prediction", "n_suppression", "share_prediction",
                          "share_suppression"],
                 {"relative_depth": ".2f", "share_prediction": ".3f", "share_suppression": ".3f"})
    _save(moments if args.all_neurons else counts, args.out)
    return EXIT_OK


def _lens(args: argparse.Namespace) -> int:
    import pandas as pd

    from stages_of_inference.stages.feature_engineering import logit_lens

    model, tokens = _load(args, args.n_tokens)
    conventions = ("paper", "per_layer_norm") if args.convention == "both" else (args.convention,)
    tables = [logit_lens(model, tokens, convention=c, progress=not args.quiet, batch_size=args.batch_size,
                         precision=args.precision)
              for c in conventions]
    table = pd.concat(tables, ignore_index=True)
    table.attrs["provenance"] = tables[0].attrs["provenance"]
    print(f"{args.model}: logit lens over {int(table['n_tokens'].iloc[0])} scored tokens of {args.corpus!r}")
    _print_table(table, ["convention", "layer", "relative_depth", "entropy_bits", "kl_to_final_nats", "accuracy",
                         "agreement_with_final"],
                 {"relative_depth": ".3f", "entropy_bits": ".2f", "kl_to_final_nats": ".3f", "accuracy": ".3f",
                  "agreement_with_final": ".3f"})
    _save(table, args.out)
    return EXIT_OK


def _models(args: argparse.Namespace) -> int:
    from stages_of_inference.models import cache_dir, list_models

    table = list_models()
    for _, row in table.iterrows():
        state = "installed" if row["installed"] else f"not installed: {row['install_command']}"
        print(f"{row['name']:<14} {row['n_layers']:>3} blocks  {state}\n{'':<14} {row['description']}")
    print("Any TransformerLens model name (gpt2, pythia-410m-deduped, phi-2, ...) loads where the Hugging "
          "Face Hub or its local cache is reachable; so does a local transformers folder (safetensors) "
          f"or a .gguf file. Converted weights are cached in {cache_dir()}.")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# parser


def _common(p: argparse.ArgumentParser, model: bool = True, text: bool = True, n_tokens: int = 512) -> None:
    if model:
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help="model name (see `stages-of-inference models`), folder or .gguf file (default: %(default)s)")
        p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                       help="TransformerLens backend: hooked, bridge, or auto (hooked where installed; default: "
                            "%(default)s)")
    if text:
        p.add_argument("--corpus", default="default",
                       help="bundled corpus (default, austen, melville), text file or folder (default: %(default)s)")
        p.add_argument("--n-tokens", type=positive, default=n_tokens,
                       help="tokens of text, in sequences of --seq-len (default: %(default)s)")
        p.add_argument("--seq-len", type=positive, default=128, help="tokens per sequence, BOS first (default: %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="which text windows are drawn (default: %(default)s)")
        p.add_argument("--batch-size", type=positive, default=8, help="sequences per forward pass (default: %(default)s)")
        p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="dtype of the model's matrix products and attention; metrics stay fp32 "
                            "(default: %(default)s, the paper's)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage dump) and exit with code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _adopt_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adopt-folder", action="store_true",
                   help="use --out-dir although it holds other files and is not a study folder (the study writes "
                        "beside them and never touches them)")


def _distributed_options(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("distributed", "split the study over processes (docs/distributed/)")
    group.add_argument("--ray", nargs="?", const=LOCAL_RAY, default=None, metavar="ADDRESS",
                       help="run on Ray (pip install 'stages-of-inference[ray]'): alone, a local cluster on this "
                            "machine's cores; 'auto' the cluster running here; host:port that head")
    group.add_argument("--workers", type=positive, default=None,
                       help="with --ray: actors alive at once (default: as many as the cluster's GPUs or CPUs allow)")
    group.add_argument("--cpus-per-worker", type=float, default=1.0,
                       help="with --ray: CPUs (and torch threads) per actor (default: %(default)s)")
    group.add_argument("--gpus-per-worker", type=float, default=None,
                       help="with --ray: GPUs per actor, a fraction lets small models share one (default: 1 where "
                            "the cluster has GPUs, else 0)")
    group.add_argument("--shards", type=positive, default=None,
                       help="with --ray: shards of the sweep's batch (default: one per worker)")
    group.add_argument("--max-retries", type=int, default=2,
                       help="with --ray: runs of a task again after its worker died (default: %(default)s)")
    group.add_argument("--shard", default=None, metavar="I/N",
                       help="run shard I of N (1 <= I <= N) and write its task results only; then `merge` the folders")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``stages-of-inference`` command."""
    parser = _Parser(
        prog="stages-of-inference",
        description="Layer deletion, layer swaps and the four stages of inference in language models "
                    "(Lad, Lee, Gurnee & Tegmark, arXiv:2406.19384), on TransformerLens models.",
        epilog="Exit codes: 0 done; 2 bad argument or input (one line on stderr: a bad option, a folder that is not "
               "the study's to use, shards that do not merge); 3 model not available here, or a Ray head that does not "
               "answer; 4 --out-dir holds a study with other settings (with --on-mismatch error); 5 a task of a "
               "distributed study failed; 6 a file could not be written (disk full, read-only); 130 interrupted (run again to resume). Anything else is a bug (exit 1, "
               "with a traceback).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser(
        "run", help="the whole study: every analysis, an HTML report and the data files",
        description="Run every analysis of the four stages on one or more models and write report.html, one data "
                    "file per result (with JSON provenance) and, where kaleido works, PNG figures. Started again with "
                    "the same --out-dir, it reuses every finished analysis.",
    )
    add_options(run)  # one option per StudyConfig field, declared there
    run.add_argument("--out-dir", default=None, help="the study's folder (default: reports/<model>[+<model>...])")
    run.add_argument("--on-mismatch", choices=("recompute", "error"), default="recompute",
                     help="what to do with a finished analysis in --out-dir made with other settings (default: %(default)s)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    _adopt_option(run)
    _distributed_options(run)
    run.set_defaults(func=_run)

    merge = sub.add_parser(
        "merge", help="merge the task results of --shard runs into one study and its report",
        description="Read the task results that `run --shard I/N` wrote into each folder, check that every shard "
                    "of one study is there, pool them and write the study (data files and report.html) into "
                    "--out-dir, as a one-process run would.")
    merge.add_argument("folders", nargs="+", metavar="DIR", help="the --out-dir of each --shard run")
    merge.add_argument("--out-dir", required=True, help="the study's folder")
    merge.add_argument("--quiet", action="store_true", help="no progress bars")
    _adopt_option(merge)
    merge.set_defaults(func=_merge)

    sweep = sub.add_parser("sweep", help="delete every block and swap every adjacent pair; print the damage",
                           description="The robustness sweep alone: KL, loss, accuracy retained and top-1 agreement "
                                       "for every single-block deletion and adjacent swap.")
    _common(sweep)
    sweep.add_argument("--kinds", default="drop,swap", help="drop, swap or drop,swap (default: %(default)s)")
    sweep.add_argument("--out", default=None, help="save the table here (.parquet or .csv, with .json provenance)")
    sweep.set_defaults(func=_sweep)

    neurons = sub.add_parser("neurons", help="prediction and suppression neurons per layer (weights only)",
                             description="Moments over the vocabulary of every MLP neuron's output-weight cosines with "
                                         "the unembedding; counts of prediction (kurtosis > threshold, skew > 0) and "
                                         "suppression (skew < 0) neurons per layer.")
    _common(neurons, text=False)
    neurons.add_argument("--threshold", type=float, default=10.0, help="kurtosis threshold (default: %(default)s)")
    neurons.add_argument("--all-neurons", action="store_true", help="with --out, save every neuron's moments, not the counts")
    neurons.add_argument("--out", default=None, help="save the table here (.parquet or .csv, with .json provenance)")
    neurons.set_defaults(func=_neurons)

    lens = sub.add_parser("lens", help="the logit-lens trajectory (entropy, KL to the output, accuracy)",
                          description="The logit lens at every readout (0 = embeddings ... n_layers = output), in the "
                                      "paper's convention (final-layer norm scale), the per-layer-norm one, or both.")
    _common(lens, n_tokens=256)
    lens.add_argument("--convention", choices=("paper", "per_layer_norm", "both"), default="both",
                      help="lens convention (default: %(default)s)")
    lens.add_argument("--out", default=None, help="save the table here (.parquet or .csv, with .json provenance)")
    lens.set_defaults(func=_lens)

    models = sub.add_parser("models", help="known models, which are installed, how to get the rest",
                            description="List the embedded models, whether their weights are installed, and how to "
                                        "install them; other models load by hub name, folder or .gguf file.")
    models.set_defaults(func=_models)
    return parser


def default_threads() -> int:
    """The torch threads the command line uses: the cores this process may run on (its CPU
    affinity, and a cgroup's CPU quota where one is set), not the machine's count.

    Example:
        >>> default_threads() >= 1
        True
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _threads_for_this_process() -> None:
    """Where the command line owns the process: OpenMP threads that sleep rather than spin while
    they wait (``OMP_WAIT_POLICY=PASSIVE``, set before torch starts its pool: on a machine whose
    cores are busy with other work, spinning threads fight that work; docs/benchmarks.md), and
    :func:`default_threads` threads; either is left as it is where the user set it (the
    environment variable, or ``OMP_NUM_THREADS``).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "OMP_NUM_THREADS" not in os.environ and "torch" not in sys.modules:
        import torch

        torch.set_num_threads(default_threads())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stages-of-inference`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    _threads_for_this_process()
    from stages_of_inference._utils import WriteError
    from stages_of_inference.models import UnavailableError
    from stages_of_inference.study.distributed import TaskFailedError
    from stages_of_inference.study.folder import StudyMismatchError

    try:
        return int(args.func(args))
    except (UnavailableError, ConnectionError) as error:
        print(f"stages-of-inference: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except WriteError as error:
        print(f"stages-of-inference: {' '.join(str(error).split())}; nothing half-written is left: free space (or make "
              "the folder writable) and run the same command again, finished results are reused", file=sys.stderr)
        return EXIT_WRITE
    except TaskFailedError as error:
        print(f"stages-of-inference: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_TASK_FAILED
    except StudyMismatchError as error:
        print(f"stages-of-inference: {error}", file=sys.stderr)
        return EXIT_MISMATCH
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, NotImplementedError, ImportError) as error:
        print(f"stages-of-inference: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("stages-of-inference: interrupted (run again with the same --out-dir to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
