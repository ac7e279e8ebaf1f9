"""The study's built-in analyses: one :func:`~stages_of_inference.study.registry.register` call
each, naming the stage function that computes it, its settings, its figure and its reading.

Adding an analysis to the study is a function in a stage module (a tidy table with provenance),
and one entry here (or a ``register`` call in your own code), plus its test and docs.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from stages_of_inference import plots, robustness
from stages_of_inference._utils import file_sha256
from stages_of_inference.batch import TokenBatch
from stages_of_inference.data import corpus_documents, load_token_batch
from stages_of_inference.interventions.checkpoint import CheckpointMismatchError
from stages_of_inference.interventions.options import EngineOptions
from stages_of_inference.jacobian_lens import DEFAULT_SKIP_FIRST_POSITIONS, fit_jacobian_lens
from stages_of_inference.stages import competing, guesses, sinks
from stages_of_inference.stages import detokenization as detok
from stages_of_inference.stages import feature_engineering as fe
from stages_of_inference.stages import prediction_ensembling as pe
from stages_of_inference.stages import residual_sharpening as rs
from stages_of_inference.stages import task_damage as td
from stages_of_inference.study import readings as rd
from stages_of_inference.study.registry import (
    REGISTRY,
    Analysis,
    Context,
    Figure,
    Finishing,
    Study,
    Style,
    Tables,
    one_figure,
    register,
    tables_of,
    whole,
)
from stages_of_inference.tuned_lens import TuningSettings, train_tuned_lens

if TYPE_CHECKING:  # annotations only
    from stages_of_inference.study.config import StudyConfig

__all__ = ["CLOZE_CONTEXT_CHARS", "CLOZE_CONTEXT_TOKENS", "GENERATION_PROMPT_TOKENS", "NEW_TOKENS", "PAPER_ANALYSES",
           "RUN_POSITIONS", "SUBJOINER_CHARS", "SUBLAYER_KINDS", "SUBLAYER_POSITIONS", "TUNED_LENS_SEQUENCES", "banded",
           "training_split", "tuning_settings"]

SUBJOINER_CHARS = 200_000
"""The subjoiner prompts (and cloze items) are drawn from the first this many characters of each document."""


def banded(draw: Any) -> Any:
    """A figure function of :mod:`stages_of_inference.plots` that takes ``stages`` and ``colors``,
    as the ``draw(tables, style)`` of a registry figure: the study's bands and model colours.
    """
    return lambda tables, style: draw(tables, stages=style.stages, colors=style.colors)


def _options(ctx: Context, **more: Any) -> EngineOptions:
    """The engine options a study's analysis runs with."""
    return EngineOptions(batch_size=ctx.config.batch_size, progress=ctx.progress, precision=ctx.config.precision, **more)


def _batch(config: StudyConfig) -> dict[str, Any]:
    return {"batch_size": config.batch_size, "precision": config.precision}


def _heavy(config: StudyConfig) -> dict[str, Any]:
    return {"sequences": config.heavy_sequences, "batch_size": config.batch_size, "precision": config.precision}


# --------------------------------------------------------------------------- the paper's analyses
def _sweep(ctx: Context, tokens: TokenBatch, kinds: tuple[str, ...], options: EngineOptions) -> Tables:
    """A sweep's additive part on ``tokens`` (a whole batch, or one shard of it), checkpointed in
    the task's own folder.
    """
    def sweep() -> Tables:
        return robustness.sweep_partial(ctx.model, tokens, kinds, options=options, first_sequence=ctx.first_sequence,
                                        checkpoint_dir=ctx.work_dir)
    try:
        return sweep()
    except CheckpointMismatchError:  # another sweep's checkpoint in this task's own folder: start over
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
        return sweep()


def _robustness(ctx: Context) -> Tables:
    """The paper's sweep on ``ctx.tokens`` (the whole batch, or one shard of it)."""
    return _sweep(ctx, ctx.tokens, robustness.PAPER_KINDS, _options(ctx, per_token=True, layer_effects=True))


def _robustness_finish(parts: list[Tables], fin: Finishing) -> Tables:
    return dict(robustness.finish_sweep(parts).tables)


def _robustness_figures(study: Study, style: Style) -> list[Figure]:
    sweeps = [done["robustness"] for done in study.results.values() if "robustness" in done]
    if not sweeps:
        return []
    out = [Figure("robustness", "Deleting and swapping blocks",
                  lambda: plots.robustness(sweeps, stages=style.stages, colors=style.colors),
                  lambda: rd.read_robustness(study))]
    effects = tables_of(study, "robustness", "layer_effects")
    if effects:
        out.append(Figure("layer_effects", "Beyond the paper: the layer-effect matrix",
                          lambda: banded(plots.layer_effects)(effects, style), lambda: rd.read_layer_effects(study)))
    return out


def _attention(ctx: Context) -> Tables:
    return detok.previous_token_attention_tables(ctx.model, ctx.tokens, k=ctx.config.k, batch_size=ctx.config.batch_size,
                                                 progress=ctx.progress, precision=ctx.config.precision)


def _documents(corpus: str) -> list[str]:
    """The start of each document of the corpus, where prompts and cloze items are drawn: scanning
    all of a long corpus costs more than the forward passes, and a few hundred thousand words hold
    plenty of candidates.
    """
    return [text[:SUBJOINER_CHARS] for text in corpus_documents(corpus)]


def _subjoiner(ctx: Context) -> Tables:
    result = detok.subjoiner_heads(ctx.model, _documents(ctx.config.corpus), max_prompts=ctx.config.subjoiner_prompts,
                                   seed=ctx.config.seed, progress=ctx.progress, precision=ctx.config.precision)
    return {"heads": result.heads, "patterns": detok.pattern_table(result)}


def _subjoiner_figures(study: Study, style: Style) -> list[Figure]:
    heads = tables_of(study, "subjoiner_heads", "heads")
    if not heads:
        return []
    out = [Figure("subjoiner_scores", "Stage 1: subjoiner heads",
                  lambda: plots.subjoiner_scores(heads, stages=style.stages, colors=style.colors),
                  lambda: rd.read_subjoiner(study))]
    for i, (name, done) in enumerate(study.results.items()):
        if "subjoiner_heads" in done:
            patterns, top = done["subjoiner_heads"]["patterns"], done["subjoiner_heads"]["heads"]
            out.append(Figure(f"subjoiner_patterns_{i + 1}", f"Stage 1: subjoiner attention patterns ({name})",
                              lambda p=patterns, h=top: plots.subjoiner_patterns(p, top=3, ranked=h),
                              lambda n=name, p=patterns, h=top: rd.read_patterns(n, p, h)))
    return out


def _lens(ctx: Context) -> Tables:
    # the lens and the prediction depth of every token come from the same pass, per convention
    passes = [fe.lens_tables(ctx.model, ctx.heavy, convention=c, batch_size=ctx.config.batch_size,
                             progress=ctx.progress, precision=ctx.config.precision)
              for c in ("paper", "per_layer_norm")]
    out = {}
    for key in ("lens", "depth", "depth_summary", "per_sequence"):
        out[key] = pd.concat([p[key] for p in passes], ignore_index=True)
        out[key].attrs["provenance"] = passes[0][key].attrs["provenance"]
    return out


def _lens_figures(study: Study, style: Style) -> list[Figure]:
    out = one_figure("logit_lens", "Stage 2: the logit lens", "logit_lens", "lens", banded(plots.logit_lens),
                     rd.read_lens)(study, style)
    depth = tables_of(study, "logit_lens", "depth")
    if depth:
        out.append(Figure("prediction_depth", "Beyond the paper: prediction depth",
                          lambda: banded(plots.prediction_depth)(depth, style), lambda: rd.read_depth(study)))
    return out


def _similarity(ctx: Context) -> Tables:
    return {"similarity": fe.layer_similarity(ctx.model, ctx.tokens, method="cka", batch_size=ctx.config.batch_size,
                                              progress=ctx.progress, precision=ctx.config.precision)}


def _probes(ctx: Context) -> Tables:
    return {"probes": fe.probe_layers(ctx.model, ctx.tokens, ctx.config.probe_label, seed=ctx.config.seed,
                                      batch_size=ctx.config.batch_size, progress=ctx.progress,
                                      precision=ctx.config.precision)}


def _neurons(ctx: Context) -> Tables:
    moments = pe.neuron_moments(ctx.model, ctx.config.kurtosis_threshold, progress=ctx.progress)
    return {"counts": pe.neuron_counts(moments, n_layers=ctx.model.cfg.n_layers), "moments": moments}


def _neuron_plot(tables: list[pd.DataFrame], style: Style) -> Any:
    return plots.neuron_counts(tables, share=len(tables) > 1, stages=style.stages, colors=style.colors)


def _sharpening(ctx: Context) -> Tables:
    done, bs, precision = ctx.done, ctx.config.batch_size, ctx.config.precision
    moments = done["neurons"]["moments"] if "neurons" in done else True
    lens = done["logit_lens"]["lens"] if "logit_lens" in done else None  # same heavy tokens: read, not redone
    profile = rs.sharpening_profile(ctx.model, ctx.heavy, moments=moments, kurtosis_threshold=ctx.config.kurtosis_threshold,
                                    lens=lens, batch_size=bs, progress=ctx.progress, precision=precision)
    ablation = rs.final_block_ablation(ctx.model, ctx.heavy, last_k=(1, 2, 3), batch_size=bs, progress=ctx.progress,
                                       precision=precision)
    return {"profile": profile, "final_blocks": ablation}


def _repetition(ctx: Context) -> Tables:
    return {"repetition": rs.block_repetition(ctx.model, ctx.heavy, times=2, batch_size=ctx.config.batch_size,
                                              progress=ctx.progress, precision=ctx.config.precision)}


register(Analysis(
    "robustness", _robustness,
    lambda c: {"kinds": ["drop", "swap"], "per_token": True, "layer_effects": True, **_batch(c)},
    figures=_robustness_figures, fast=True, split=True, finish=_robustness_finish))
register(Analysis(
    "previous_token_attention", _attention, lambda c: {"k": c.k, **_batch(c)},
    figures=one_figure("previous_token_attention", "Stage 1: attention to the previous tokens",
                       "previous_token_attention", "attention", banded(plots.previous_token_attention),
                       rd.read_attention), fast=True))
register(Analysis(
    "subjoiner_heads", _subjoiner,
    lambda c: {"corpus": c.corpus, "max_prompts": c.subjoiner_prompts, "seed": c.seed, "n_pieces": 4,
               "n_context_words": 16, "characters_per_document": SUBJOINER_CHARS, "precision": c.precision},
    tokens="none", figures=_subjoiner_figures))
register(Analysis(
    "logit_lens", _lens,
    lambda c: {"conventions": ["paper", "per_layer_norm"], "prediction_depth": True, **_heavy(c)}, tokens="heavy",
    figures=_lens_figures))
register(Analysis(
    "layer_similarity", _similarity, lambda c: {"method": "cka", **_batch(c)},
    figures=one_figure("layer_similarity", "Stage 2: similarity of the blocks", "layer_similarity", "similarity",
                       lambda tables, style: plots.layer_similarity(tables), rd.read_similarity), fast=True))
register(Analysis(
    "probes", _probes, lambda c: {"label": c.probe_label, "seed": c.seed, **_batch(c)},
    figures=one_figure("probes", "Stage 2: probes", "probes", "probes", banded(plots.probe_accuracy), rd.read_probes)))
register(Analysis(
    "neurons", _neurons, lambda c: {"kurtosis_threshold": c.kurtosis_threshold}, tokens="none",
    figures=one_figure("neuron_counts", "Stage 3: prediction and suppression neurons", "neurons", "counts",
                       _neuron_plot, rd.read_neurons), fast=True))
register(Analysis(
    "sharpening", _sharpening,
    lambda c: {"convention": "per_layer_norm", "kurtosis_threshold": c.kurtosis_threshold, "last_k": [1, 2, 3],
               **_heavy(c)},
    tokens="heavy", needs=("neurons", "logit_lens"),
    figures=one_figure("sharpening", "Stage 4: residual sharpening", "sharpening", "profile",
                       banded(plots.sharpening_profile), rd.read_sharpening)))
register(Analysis(
    "repetition", _repetition, lambda c: {"times": 2, "blocks": "each block alone", **_heavy(c)}, tokens="heavy",
    figures=one_figure("repetition", "Stage 4: layer repetition", "repetition", "repetition",
                       banded(plots.layer_repetition), rd.read_repetition)))

PAPER_ANALYSES = tuple(REGISTRY)
"""The analyses of the paper, in the order a study runs them."""


# --------------------------------------------------------------------------- beyond the paper
def _sinks(ctx: Context) -> Tables:
    return {"profile": sinks.sink_profile(ctx.model, ctx.tokens, batch_size=ctx.config.batch_size,
                                          progress=ctx.progress, precision=ctx.config.precision)}


GENERATION_PROMPT_TOKENS = 16
"""Tokens of each generation-check prompt (BOS included): the start of a main-batch sequence."""
CLOZE_CONTEXT_CHARS = 100
"""Characters of text before each cloze answer the study draws (then cut to its last tokens)."""
CLOZE_CONTEXT_TOKENS = 24
"""Context tokens of each cloze item in the study (the end of the 100 characters drawn)."""
NEW_TOKENS = 16
"""Tokens of the greedy continuations the generation check compares."""


def _task(ctx: Context) -> Tables:
    config = ctx.config
    if config.cloze_file is not None:
        items = td.load_cloze_items(config.cloze_file)
    else:
        items = td.cloze_items(_documents(config.corpus), n_items=config.cloze_items, seed=config.seed,
                               context_chars=CLOZE_CONTEXT_CHARS)
    prompts = ctx.tokens.tokens[: config.generation_prompts, :GENERATION_PROMPT_TOKENS]
    # with the sweep in the study, the paper's token-level accuracy is read from it (finish), not measured again
    later = "robustness" in config.analyses
    return {"task": td.task_damage(ctx.model, items, prompts, context_tokens=CLOZE_CONTEXT_TOKENS, new_tokens=NEW_TOKENS,
                                   batch_size=config.batch_size, progress=ctx.progress, precision=config.precision,
                                   token_level=False if later else None)}


def _task_finish(parts: list[Tables], fin: Finishing) -> Tables:
    tables = whole(parts, fin)
    if "robustness" not in fin.done:  # not in the study: the task analysis measured it on its cloze sequences
        return tables
    return {"task": td.with_token_level(tables["task"], fin.done["robustness"]["summary"])}


def _task_settings(c: StudyConfig) -> dict[str, Any]:
    source = {"cloze_file_sha256": file_sha256(Path(c.cloze_file))} if c.cloze_file else {
        "corpus": c.corpus, "cloze_items": c.cloze_items, "seed": c.seed, "characters_per_document": SUBJOINER_CHARS,
        "context_chars": CLOZE_CONTEXT_CHARS, "answer_in_context": True}
    return {**source, "context_tokens": CLOZE_CONTEXT_TOKENS, "generation_prompts": c.generation_prompts,
            "token_level": "robustness sweep" if "robustness" in c.analyses else "cloze sequences",
            "prompt_tokens": GENERATION_PROMPT_TOKENS, "new_tokens": NEW_TOKENS, **_batch(c)}


def _task_figures(study: Study, style: Style) -> list[Figure]:
    tables = tables_of(study, "task", "task")
    if not tables:
        return []
    sweeps = {name: done["robustness"]["summary"] for name, done in study.results.items() if "robustness" in done}
    return [Figure("task_damage", "Beyond the paper: damage at the task level",
                   lambda: banded(plots.task_damage)(tables, style), lambda: rd.read_task(study, sweeps))]


SUBLAYER_KINDS = ("drop_attention", "drop_mlp")
"""The sublayer deletions the study sweeps (on the heavy batch: each costs as much as a block deletion)."""
SUBLAYER_POSITIONS = 64
"""The sublayer deletions run on the first this many tokens of each heavy sequence (half of the
default window: the default study's time budget; attention is causal, so the whole-block deletions
on the same tokens are read from the main sweep's per-token table)."""


def _sublayer_positions(config: StudyConfig) -> int:
    return min(SUBLAYER_POSITIONS, config.seq_len)


def _sublayers(ctx: Context) -> Tables:
    """Every block's attention alone and MLP alone deleted, on the start of each heavy sequence."""
    n_pos = _sublayer_positions(ctx.config)
    tokens = replace(ctx.heavy, tokens=ctx.heavy.tokens[:, :n_pos])
    result = robustness.robustness_sweep(ctx.model, tokens, kinds=SUBLAYER_KINDS, options=_options(ctx))
    return dict(result.tables)


def _sublayers_finish(parts: list[Tables], fin: Finishing) -> Tables:
    """The sublayer sweep, and beside it the robustness sweep's whole-block deletions on the same
    tokens, read from its per-token table (a prefix of a sequence gives its positions the same
    predictions: attention is causal).
    """
    tables = dict(whole(parts, fin))
    sweep = fin.done.get("robustness")
    if sweep is not None and "per_token" in sweep.tables:
        n_pos, n_seq = _sublayer_positions(fin.config), fin.config.heavy_sequences
        record = tables["summary"].attrs.get("provenance", {})
        per_token = sweep["per_token"]
        same = per_token[per_token["position"] <= n_pos - 2]  # the positions scored in the prefix
        blocks = robustness.summary_on(same, range(n_seq), int(record["model"]["n_layers"]))
        tables["blocks"] = blocks[blocks["kind"] == "drop"].reset_index(drop=True)
        tables["blocks"].attrs["provenance"] = {**record, "analysis": "robustness_sweep (per-token subset)",
                                                "sequences": n_seq, "positions": f"1 .. {n_pos - 2}"}
    return tables


def _sublayer_figures(study: Study, style: Style) -> list[Figure]:
    tables = [_with_blocks(done["sublayers"]["summary"], done["sublayers"].tables.get("blocks"))
              for done in study.results.values() if "sublayers" in done]
    if not tables:
        return []
    return [Figure("sublayer_deletion", "Beyond the paper: deleting only the attention or only the MLP",
                   lambda: banded(plots.sublayer_deletion)(tables, style), lambda: rd.read_sublayers(study))]


def _with_blocks(summary: pd.DataFrame, blocks: pd.DataFrame | None) -> pd.DataFrame:
    """The sublayer summary with the whole-block deletions on the same sequences appended."""
    if blocks is None:
        return summary
    out = pd.concat([summary, blocks[[c for c in blocks.columns if c in summary.columns]]], ignore_index=True)
    out.attrs = summary.attrs
    return out


register(Analysis(
    "task", _task, _task_settings, figures=_task_figures, finish=_task_finish, reads=("robustness",)))
register(Analysis(
    "sublayers", _sublayers, lambda c: {"kinds": list(SUBLAYER_KINDS), "positions": _sublayer_positions(c), **_heavy(c)},
    tokens="heavy", finish=_sublayers_finish, reads=("robustness",), figures=_sublayer_figures))
register(Analysis(
    "sinks", _sinks, _batch,
    figures=one_figure("sink_profile", "Beyond the paper: attention sinks, massive activations, residual norms", "sinks",
                       "profile", banded(plots.sink_profile), rd.read_sinks), fast=True))


RUN_POSITIONS = 64
"""Contiguous deletions run on the first this many tokens of each heavy sequence (as the sublayer
deletions do: the default study's time budget; a model of 30 blocks has 159 runs of 2 .. 7)."""


def _run_tokens(ctx: Context) -> TokenBatch:
    return replace(ctx.heavy, tokens=ctx.heavy.tokens[:, : min(RUN_POSITIONS, ctx.config.seq_len)])


def _contiguous(ctx: Context) -> Tables:
    """Every run of 2 .. a quarter of the blocks deleted, every start, and the single deletions on
    the same tokens (the threshold and the ``k = 1`` curve), in one prefix-sharing sweep.
    """
    kinds = ("drop", *robustness.run_kinds(ctx.model.cfg.n_layers))
    return _sweep(ctx, _run_tokens(ctx), kinds, _options(ctx))


def _contiguous_finish(parts: list[Tables], fin: Finishing) -> Tables:
    result = robustness.finish_sweep(parts)
    summary = result.summary
    n_layers = int(summary.attrs["provenance"]["model"]["n_layers"])
    singles = summary[summary["kind"] == "drop"]
    runs = robustness.run_table(summary, n_layers)
    ones = robustness.run_table(singles.assign(kind="drop_1"), n_layers)
    record = summary.attrs["provenance"]
    tables = {"summary": summary, "runs": pd.concat([ones, runs], ignore_index=True),
              "collapse": robustness.run_collapse(runs, singles, n_layers)}
    for name in ("runs", "collapse"):
        tables[name].attrs["provenance"] = {**record, "analysis": f"contiguous deletions ({name})"}
    return tables


def _contiguous_figures(study: Study, style: Style) -> list[Figure]:
    tables = [done["contiguous_deletions"]["runs"] for done in study.results.values() if "contiguous_deletions" in done]
    if not tables:
        return []
    return [Figure("contiguous_deletions", "Beyond the paper: deleting runs of adjacent blocks",
                   lambda: banded(plots.contiguous_deletions)(tables, style), lambda: rd.read_contiguous(study))]


def _competing(ctx: Context) -> Tables:
    return competing.depth_proxies(ctx.model, ctx.tokens, batch_size=ctx.config.batch_size, progress=ctx.progress,
                                   precision=ctx.config.precision)


def _competing_finish(parts: list[Tables], fin: Finishing) -> Tables:
    """The phases, and with the sweep in the study, each proxy against the deletion damage."""
    tables = dict(whole(parts, fin))
    record = tables["readouts"].attrs.get("provenance", {})
    tables["phases"] = competing.phase_boundaries(tables["readouts"])
    sweep = fin.done.get("robustness")
    if sweep is not None:
        summary = sweep["summary"]
        drops = summary[summary["kind"] == "drop"].set_index("layer")["kl_nats"]
        blocks = tables["blocks"].copy()
        blocks["deletion_kl"] = blocks["layer"].map(lambda i: float(drops.get(i, float("nan"))))
        tables["blocks"] = blocks
        tables["agreement"] = competing.proxy_agreement(blocks, summary)
    for name, table in tables.items():
        table.attrs["provenance"] = {**record, "analysis": f"competing readings ({name})"}
    return tables


def _competing_figures(study: Study, style: Style) -> list[Figure]:
    readouts = tables_of(study, "competing_readings", "readouts")
    blocks = tables_of(study, "competing_readings", "blocks")
    if not readouts:
        return []
    return [Figure("competing_readings", "Beyond the paper: competing readings of depth",
                   lambda: plots.competing_readings(readouts, blocks, stages=style.stages, colors=style.colors),
                   lambda: rd.read_competing(study))]


register(Analysis(
    "contiguous_deletions", _contiguous,
    lambda c: {"kinds": "drop, then drop_2 .. drop_<n_layers // 4>", "positions": min(RUN_POSITIONS, c.seq_len),
               **_heavy(c)},
    tokens="heavy", split=True, finish=_contiguous_finish, figures=_contiguous_figures))
register(Analysis(
    "competing_readings", _competing, lambda c: {"alpha": 1.0, **_batch(c)}, finish=_competing_finish,
    reads=("robustness",), figures=_competing_figures, fast=True))


TUNED_LENS_SEQUENCES = 32
"""Sequences (of the study's ``seq_len``) of the tuned lens's training split."""


def tuning_settings(config: StudyConfig) -> TuningSettings:
    """How the study trains its tuned lens: ``config.tuned_lens_steps`` steps, the rest the defaults."""
    return TuningSettings(steps=config.tuned_lens_steps, seed=config.seed, precision=config.precision)


def training_split(model: Any, config: StudyConfig, batch: TokenBatch) -> TokenBatch:
    """The study's training split: :data:`TUNED_LENS_SEQUENCES` windows of the corpus drawn with
    the study's seed that are not in its token batch ``batch`` (the lens is never trained on the
    tokens it is judged on). A corpus without that many other windows is refused.
    """
    wanted = config.n_sequences + TUNED_LENS_SEQUENCES
    try:
        drawn = load_token_batch(model, config.corpus, wanted, config.seq_len, config.seed)
    except ValueError as error:
        raise ValueError(f"the tuned lens needs {TUNED_LENS_SEQUENCES} windows of the corpus beyond the study's "
                         f"{config.n_sequences}: {error}") from None
    held = {tuple(row) for row in batch.tokens.tolist()}
    rows = [i for i, row in enumerate(drawn.tokens.tolist()) if tuple(row) not in held][:TUNED_LENS_SEQUENCES]
    if len(rows) < TUNED_LENS_SEQUENCES:
        raise ValueError(f"the corpus holds only {len(rows)} windows outside the study's batch; the tuned lens needs "
                         f"{TUNED_LENS_SEQUENCES}: give more text or a smaller n_tokens")
    return replace(drawn, tokens=drawn.tokens[rows])


def _tuned(ctx: Context) -> Tables:
    """Train the tuned lens on the training split (or reuse the cached one), then read the heavy
    batch through it: the logit-lens tables in the ``"tuned"`` convention, and the training KL.
    """
    config = ctx.config
    lens = train_tuned_lens(ctx.model, training_split(ctx.model, config, ctx.tokens), tuning_settings(config),
                            batch_size=config.batch_size, progress=ctx.progress)
    tables = fe.lens_tables(ctx.model, ctx.heavy, convention=lens, batch_size=config.batch_size, progress=ctx.progress,
                            precision=config.precision)
    record = tables["lens"].attrs["provenance"]
    last = lens.provenance["train_kl_nats"]
    tables["training"] = pd.DataFrame({"layer": range(len(last)), "train_kl_nats": last})
    tables["training"].attrs["provenance"] = {**record, "analysis": "tuned lens (training)",
                                              "training_tokens": lens.provenance["tokens"]}
    return tables


def _jacobian(ctx: Context) -> Tables:
    """Fit the Jacobian lens on the first ``jacobian_lens_prompts`` windows of the training split
    (or reuse the cached one), then read the heavy batch through it.
    """
    config = ctx.config
    prompts = training_split(ctx.model, config, ctx.tokens)[: config.jacobian_lens_prompts]
    lens = fit_jacobian_lens(ctx.model, prompts, skip_first_positions=_jacobian_skip(config), cache=True,
                             progress=ctx.progress)
    return fe.lens_tables(ctx.model, ctx.heavy, convention=lens, batch_size=config.batch_size, progress=ctx.progress,
                          precision=config.precision)


def _jacobian_skip(config: StudyConfig) -> int:
    """Leading positions the Jacobian lens leaves out: the reference's 16, at most a quarter of a window."""
    return min(DEFAULT_SKIP_FIRST_POSITIONS, config.seq_len // 4)


TRANSLATED = ("tuned_lens", "jacobian_lens")
"""The analyses that read the heavy batch through a translated lens (drawn in one figure)."""


def _lens_tables(done: dict[str, Any]) -> pd.DataFrame | None:
    """A model's lens tables of every lens the study has, one table (``convention`` says which)."""
    parts = [done[a]["lens"] for a in ("logit_lens", *TRANSLATED) if a in done]
    if not any(a in done for a in TRANSLATED):
        return None
    merged = pd.concat(parts, ignore_index=True)
    merged.attrs = parts[-1].attrs
    return merged


def _translated_figures(study: Study, style: Style) -> list[Figure]:
    tables = [t for t in (_lens_tables(done) for done in study.results.values()) if t is not None]
    if not tables:
        return []
    return [Figure("tuned_lens", "Beyond the paper: the tuned and Jacobian lenses against the logit lens",
                   lambda: banded(plots.lens_comparison)(tables, style), lambda: rd.read_tuned(study))]


register(Analysis(
    "tuned_lens", _tuned,
    lambda c: {"convention": "tuned", "training_sequences": TUNED_LENS_SEQUENCES,
               "training_split": "windows drawn with the study's seed outside its batch",
               "tuning": dataclasses.asdict(tuning_settings(c)), "prediction_depth": True, **_heavy(c)},
    tokens="heavy", figures=_translated_figures))
register(Analysis(
    "jacobian_lens", _jacobian,
    lambda c: {"convention": "jacobian", "prompts": c.jacobian_lens_prompts,
               "training_split": "windows drawn with the study's seed outside its batch",
               "skip_first_positions": _jacobian_skip(c), "prediction_depth": True, **_heavy(c)},
    tokens="heavy", default=False, figures=lambda study, style: (
        [] if any("tuned_lens" in done for done in study.results.values()) else _translated_figures(study, style))))


def _counts(ctx: Context) -> Any:
    """Token counts of the main batch and the training split (the frequency ranks of guess then
    refine: a sample of the same text larger than the heavy batch it reads).
    """
    text = torch.cat([ctx.tokens.tokens, training_split(ctx.model, ctx.config, ctx.tokens).tokens]).reshape(-1)
    return np.bincount(text.cpu().numpy(), minlength=ctx.model.cfg.d_vocab)


def _guesses(ctx: Context) -> Tables:
    config = ctx.config
    return guesses.guess_then_refine(ctx.model, ctx.heavy, "paper", frequencies=_counts(ctx),
                                     batch_size=config.batch_size, progress=ctx.progress, precision=config.precision)


def _guess_figures(study: Study, style: Style) -> list[Figure]:
    out = []
    for i, (name, done) in enumerate(study.results.items()):
        if "guess_then_refine" in done:
            buckets = done["guess_then_refine"]["buckets"]
            bands = [s for s in (style.stages or []) if len(s) and str(s["model"].iloc[0]) == name]
            out.append(Figure(f"guess_then_refine_{i + 1}", f"Beyond the paper: guess then refine ({name})",
                              lambda b=buckets, s=bands: plots.guess_then_refine(b, stages=s or None),
                              lambda n=name: rd.read_guesses(study, n)))
    return out


register(Analysis(
    "guess_then_refine", _guesses,
    lambda c: {"convention": "paper", "frequencies": "token counts of the main batch and the tuned lens's training split",
               "buckets": list(guesses.BUCKETS), "function_words": len(guesses.FUNCTION_WORDS), **_heavy(c)},
    tokens="heavy", figures=_guess_figures))
