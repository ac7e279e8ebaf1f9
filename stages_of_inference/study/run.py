"""The whole study in one call: every analysis for one or more models, and a self-contained report.

:func:`run_study` runs every analysis of the four stages (the robustness sweep, previous-token
attention, subjoiner heads, the logit lens in both conventions, layer similarity, probes,
prediction / suppression neurons, the sharpening profile with final-block deletions, layer
repetition, and the analyses beyond the paper), places the stages
(:func:`stages_of_inference.stages.placement.place_stages`) and writes ``out_dir``::

    out_dir/
      study.json                   the StudyConfig of the run (drives `stages-of-inference run`)
      report.html                  figures (plotly, embedded once), readings, provenance, settings
      figures/<name>.png           static figures, only where a static exporter (kaleido) works
      <model>/<analysis>/          one folder per analysis: <table>.parquet (or .csv), its
                                   <table>.parquet.json provenance, and provenance.json
      .stages-of-inference/        the study's private folder: its marker, lock, temporaries,
                                   checkpoints and task results (study.folder)

The study is planned as tasks and run by one engine (:mod:`stages_of_inference.study.engine`),
here in this process (``engine="local"``) or on a Ray cluster (``engine="ray"``,
:mod:`stages_of_inference.study.distributed`); ``--shard`` and ``merge``
(:mod:`stages_of_inference.study.sharded`) split it over independent processes. All three give
the same tables bit for bit.

Every write is atomic. A study interrupted and started again with the same ``out_dir`` reuses each
finished analysis whose recorded fingerprint (model name, config and weights hashes, the token
batch's digest, and the analysis' settings) matches this run's, and each stored task result; an
analysis whose fingerprint differs is recomputed (``on_mismatch="recompute"``, the default) or
refused (``on_mismatch="error"``). The robustness sweep also checkpoints each batch of
sequences, so an interrupted sweep resumes mid-way. The study owns its folder and nothing else
(:mod:`stages_of_inference.study.folder`).

Token budgets. ``n_tokens`` (default 1,024: 8 sequences of 128) is the batch of the robustness
sweep, the attention, similarity and probe analyses; the logit lens (two conventions), the
sharpening profile, the final-block deletions and layer repetition, which unembed every layer or
run many plans, use the first half of the sequences (docs/report.md lists the costs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from stages_of_inference._checks import check_output_path
from stages_of_inference._tl import Model
from stages_of_inference.results import model_name
from stages_of_inference.study.config import DEFAULT_OUT_DIR, StudyConfig, check_inputs
from stages_of_inference.study.distributed import RayOptions, run_on_ray
from stages_of_inference.study.engine import ON_MISMATCH, Driver, run_in_process
from stages_of_inference.study.finish import write_study
from stages_of_inference.study.folder import StudyFolder, study_writes
from stages_of_inference.study.registry import Study
from stages_of_inference.study.tasks import study_tasks

__all__ = ["ENGINES", "run_study"]

ENGINES = ("local", "ray")
"""Where a study runs: this process, or a Ray cluster."""


def run_study(
    models: str | Model | Sequence[str | Model] = ("smollm2-135m",),
    corpus: str = "default",
    n_tokens: int = 1024,
    out_dir: str | Path = DEFAULT_OUT_DIR,
    *,
    analyses: str | Sequence[str] | None = None,
    config: StudyConfig | None = None,
    on_mismatch: str = "recompute",
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    write_report: bool = True,
    precision: str = "fp32",
    engine: str = "local",
    ray_address: str | None = None,
    ray_options: RayOptions | None = None,
    adopt_folder: bool = False,
) -> Study:
    """Run every analysis of the four stages on each model and write a self-contained report.

    Args:
        models: one model or several: names (embedded keys such as ``"smollm2-135m"`` and
            ``"gemma3-270m"``, TransformerLens names where the hub is reachable, folders, ``.gguf``
            files) or already loaded ``HookedTransformer`` or ``TransformerBridge`` objects (with a
            tokenizer), which are known in the study by their name (``load_model`` records it).
        corpus: a bundled corpus name (``"default"``, ``"austen"``, ``"melville"``), a text file or a
            folder of ``.txt`` files.
        n_tokens: tokens in the main batch (sequences of 128, BOS first); the expensive analyses use
            half of it (module docstring).
        out_dir: the study's folder: new, empty, or a study folder (reused on a rerun); a folder
            holding other files is refused unless ``adopt_folder``.
        analyses: which analyses to run: one name or several of
            :data:`~stages_of_inference.study.registry.REGISTRY`, ``"all"`` or ``"fast"``
            (default: every default one; duplicates are dropped).
        config: full settings; when given, ``corpus``, ``n_tokens``, ``analyses`` and ``precision`` are ignored,
            and the models are ``config.models`` (loaded models passed in ``models`` are used for
            the names they carry).
        on_mismatch: ``"recompute"`` a finished analysis made with other settings, or ``"error"``.
        progress: progress bars.
        log: where one line per step goes (``None``: silent).
        write_report: write ``report.html`` (and static figures) at the end.
        precision: ``"fp32"`` (the paper's setting), ``"bf16"`` or ``"fp16"``: the dtype of the models'
            matrix products and attention in every analysis (:mod:`stages_of_inference.precision`);
            the report then says how far the sweep's numbers moved from fp32.
        engine: ``"local"`` (this process, one model at a time) or ``"ray"``: tasks on a Ray
            cluster (:mod:`stages_of_inference.study.distributed`; needs the ``ray`` extra), the
            same tables bit for bit (docs/distributed/).
        ray_address: with ``engine="ray"``: ``None`` starts a local cluster with this machine's
            cores, ``"auto"`` joins the one running here, ``"host:port"`` joins that head.
        ray_options: with ``engine="ray"``: a :class:`~stages_of_inference.study.distributed.RayOptions`
            (workers, CPUs and GPUs per worker, shards, retries); ``ray_address`` overrides its address.
        adopt_folder: make ``out_dir`` a study folder although it holds other files (the study
            writes beside them and never touches them; a file where the study would write is
            refused either way).

    Returns:
        A :class:`~stages_of_inference.study.registry.Study`; the report is at ``study.report``.

    Example:
        >>> study = run_study("smollm2-135m", n_tokens=512, out_dir="/tmp/soi-study",
        ...                   analyses="robustness", progress=False)  # doctest: +SKIP
        >>> study.report.name  # doctest: +SKIP
        'report.html'
    """
    given = [models] if isinstance(models, str) or not isinstance(models, Sequence) else list(models)
    loaded = {model_name(m): m for m in given if not isinstance(m, str)}
    if config is None:
        config = StudyConfig(models=tuple(m if isinstance(m, str) else model_name(m) for m in given), corpus=corpus,
                             n_tokens=n_tokens, precision=precision,
                             **({} if analyses is None else {"analyses": analyses}))
    if not isinstance(config, StudyConfig):
        raise TypeError(f"config must be a StudyConfig, got {type(config).__name__}")
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(f"on_mismatch must be 'recompute' or 'error', got {on_mismatch!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    say = log or (lambda _: None)
    check_inputs(config)
    folder = StudyFolder(check_output_path(out_dir, "out_dir folder"))
    started = time.perf_counter()
    with folder.held(adopt=adopt_folder, writes=study_writes(config), say=say):
        if engine == "ray":
            if loaded:
                raise ValueError("a study on Ray loads its models by name inside the workers; give names (or "
                                 f"folders), not loaded models ({', '.join(loaded)})")
            options = _ray_options(ray_options, ray_address)
            study = run_on_ray(config, folder, options, on_mismatch=on_mismatch, say=say)
        else:
            driver = Driver(config, folder, study_tasks(config, 1), on_mismatch=on_mismatch, say=say)
            run_in_process(driver, config, loaded, progress, say)
            study = driver.study()
        say(f"all analyses done in {time.perf_counter() - started:.0f} s")
        write_study(study, folder, write_report, say)
    return study


def _ray_options(options: Any, address: str | None) -> RayOptions:
    if options is None:
        options = RayOptions()
    if not isinstance(options, RayOptions):
        raise TypeError(f"ray_options must be a RayOptions, got {type(options).__name__}")
    return options if address is None else replace(options, address=address)
