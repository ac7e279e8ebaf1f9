"""The ``stages-of-inference`` command line.

``stages-of-inference run`` is the main job; ``stages-of-inference models`` lists the known models.
Errors in arguments or inputs are printed as one readable line with exit code 2; a model that
cannot be had here exits with code 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


def _quick_study(args: argparse.Namespace) -> int:
    """Loss and accuracy of the model, and the damage of deleting its first, middle and last block."""
    import stages_of_inference as soi
    from stages_of_inference.interventions.executor import evaluate_plans

    started = time.perf_counter()
    model = soi.load_model(args.model, device=args.device)
    tokens = soi.load_tokens(model, args.corpus, n_sequences=args.n_sequences, seq_len=args.seq_len, seed=args.seed)
    n = model.cfg.n_layers
    layers = [0, n // 2, n - 1]
    plans = [soi.LayerPlan.identity(n)] + [soi.LayerPlan.drop(n, i) for i in layers]
    table = evaluate_plans(model, tokens, plans, progress=not args.quiet)
    ref = table.attrs["reference"]
    print(f"model {args.model}: {n} blocks; corpus {args.corpus}: {tokens.shape[0]} x {tokens.shape[1]} tokens, "
          f"{int(ref['n_tokens'])} scored")
    print(f"original model: loss {ref['loss']:.3f} nats, top-1 accuracy {100 * ref['accuracy']:.1f} %")
    print(f"{'deleted block':>14} {'rel. depth':>10} {'loss':>7} {'Δloss':>7} {'KL nats':>8} {'accuracy':>9} {'retained':>9}")
    for layer, (_, row) in zip(layers, table.iloc[1:].iterrows()):
        print(f"{layer:>14d} {soi.relative_depth(layer, n):>10.2f} {row['loss']:>7.3f} {row['loss_delta']:>+7.3f} "
              f"{row['kl_nats']:>8.3f} {100 * row['accuracy']:>8.1f}% {100 * row['relative_accuracy']:>8.1f}%")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def _models(args: argparse.Namespace) -> int:
    from stages_of_inference.models import cache_dir, list_models

    table = list_models()
    for _, row in table.iterrows():
        state = "installed" if row["installed"] else f"not installed: {row['install_command']}"
        print(f"{row['name']:<14} {row['n_layers']:>3} blocks  {state}\n{'':<14} {row['description']}")
    print("Any TransformerLens model name (gpt2, pythia-410m-deduped, phi-2, ...) loads where the Hugging "
          "Face Hub or its local cache is reachable; so does a local transformers folder (safetensors) "
          f"or a .gguf file. Converted weights are cached in {cache_dir()}.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stages-of-inference",
        description="Layer deletion, layer swaps and the four stages of inference (Lad et al., arXiv:2406.19384).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the main job on a model and a corpus")
    run.add_argument("--model", default="smollm2-135m", help="model name, folder or .gguf file (default: %(default)s)")
    run.add_argument("--corpus", default="default", help="bundled corpus name, text file or folder (default: %(default)s)")
    run.add_argument("--n-sequences", type=int, default=8, help="sequences of text (default: %(default)s)")
    run.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, BOS included (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="which text windows are drawn (default: %(default)s)")
    run.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_quick_study)
    models = sub.add_parser("models", help="known models, which are installed, how to get the rest")
    models.set_defaults(func=_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stages-of-inference`` console script."""
    args = build_parser().parse_args(argv)
    from stages_of_inference.models import ModelNotAvailableError

    try:
        return int(args.func(args))
    except ModelNotAvailableError as error:
        print(f"stages-of-inference: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"stages-of-inference: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("stages-of-inference: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
