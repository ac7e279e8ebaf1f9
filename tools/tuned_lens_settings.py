"""Held-out KL of tuned lenses trained with different settings on the embedded model (how the
default of :class:`stages_of_inference.tuned_lens.TuningSettings` was chosen; docs/tuned-lens.md).

    python tools/tuned_lens_settings.py 24,96,4e-2 20,96,2e-2

Each argument is ``steps,tokens_per_step,lr``. The lens trains on 32 windows of 128 tokens of the
bundled text and is judged on 8 others (the first 8 the seed draws); the readouts are collected once.
"""

from __future__ import annotations

import sys
import time

from stages_of_inference import tuned_lens
from stages_of_inference.data import load_token_batch
from stages_of_inference.models import load_model
from stages_of_inference.stages.feature_engineering import logit_lens


def main(specs: list[str]) -> None:
    """Print the held-out KL per readout of the logit lens and of a lens trained with each spec."""
    model = load_model("smollm2-135m")
    drawn = load_token_batch(model, "default", 8 + 32, 128, 0)
    judged, training = drawn.tokens[:8], drawn.tokens[8:]
    for convention in ("per_layer_norm", "paper"):
        plain = logit_lens(model, judged, convention=convention, progress=False)["kl_to_final_nats"].to_numpy()
        print(f"logit lens ({convention})", plain.round(2).tolist(), f"mean {plain[:-1].mean():.2f}")
    readouts = tuned_lens._training_readouts(model, training, "fp32", 8)
    for spec in specs:
        steps, per_step, lr = spec.split(",")
        settings = tuned_lens.TuningSettings(steps=int(steps), tokens_per_step=int(per_step), lr=float(lr))
        start = time.perf_counter()
        weight, bias, _ = tuned_lens._fit(model, readouts, settings, progress=False)
        seconds = time.perf_counter() - start
        lens = tuned_lens.TunedLens(weight, bias)
        kl = logit_lens(model, judged, convention=lens, progress=False)["kl_to_final_nats"].to_numpy()
        print(spec, f"train {seconds:.1f} s", kl.round(2).tolist(), f"mean {kl[:-1].mean():.2f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["24,96,4e-2"])
