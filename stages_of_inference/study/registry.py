"""The study's analyses, one registry entry each.

An :class:`Analysis` says everything the study needs to know of an analysis: the settings that
determine its numbers (part of its fingerprint, so a finished result is reused only when they
match), which token batch it reads, how it runs (a function of a :class:`Context` returning named
tables), its figures, and its written reading. :func:`register` adds one; the study, the report
and the command line (``--analyses``) read :data:`REGISTRY` and know nothing else about any
analysis. Adding an analysis to the study is one ``register(Analysis(...))`` call and the
functions it names (docs/report.md, notebooks/05_extending.ipynb).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from stages_of_inference.batch import TokenBatch
from stages_of_inference.results import Result
from stages_of_inference.study import readings as rd

__all__ = ["Analysis", "Context", "Figure", "Finishing", "PAPER_ANALYSES", "REGISTRY", "SUBJOINER_CHARS", "Style", "Tables",
    "default_analyses", "fast_analyses", "register", "tables_of", "whole"]

if TYPE_CHECKING:
    from stages_of_inference.study.config import StudyConfig
    from stages_of_inference.study.run import Study

SUBJOINER_CHARS = 200_000
"""The subjoiner prompts are drawn from the first this many characters of each document."""

Tables = dict[str, pd.DataFrame]


@dataclass(frozen=True)
class Context:
    """What an analysis' ``compute`` gets.

    Attributes:
        model: the loaded model.
        tokens: the main token batch (corpus and seed recorded).
        heavy: its first ``config.heavy_sequences`` sequences (the costly analyses' batch).
        config: the study's settings.
        progress: show progress bars.
        work_dir: a folder of the analysis' own for intermediate state (checkpoints); removed
            when the analysis' result is saved.
        done: the results of the analyses already run (or reused) for this model; in a
            distributed study, only those the analysis ``needs``.
        first_sequence: for a ``split`` analysis run on one shard, the number of its batch's
            first sequence in the whole batch (``tokens`` or ``heavy`` is then the shard); else 0.
    """

    model: Any
    tokens: TokenBatch
    heavy: TokenBatch
    config: StudyConfig
    progress: bool
    work_dir: Path
    done: dict[str, Result]
    first_sequence: int = 0


@dataclass(frozen=True)
class Finishing:
    """What an analysis' ``finish`` gets (no model: it runs where the study's tables are put
    together, in the study, in ``merge`` or on a Ray driver).

    Attributes:
        config: the study's settings.
        done: the finished results of the analyses before it in the study, for this model.
    """

    config: StudyConfig
    done: dict[str, Result]


def whole(parts: list[Tables], fin: Finishing) -> Tables:
    """The ``finish`` of an analysis that runs as one task: its tables as they are.

    Example:
        >>> from stages_of_inference.study.config import StudyConfig
        >>> t = {"n": pd.DataFrame({"n": [1]})}
        >>> whole([t], Finishing(StudyConfig(), {})) is t
        True
    """
    if len(parts) != 1:
        raise ValueError(f"an analysis that is not split runs as one task; got {len(parts)} sets of tables")
    return parts[0]


@dataclass(frozen=True)
class Figure:
    """One figure of the report: a name (its anchor and file name), a title, how to draw it and
    its written reading (HTML).
    """

    name: str
    title: str
    draw: Callable[[], Any]
    reading: Callable[[], str]


@dataclass(frozen=True)
class Style:
    """What every figure of one report shares: the stage tables (bands) and the model colours."""

    stages: list[pd.DataFrame] | None
    colors: dict[str, str]


@dataclass(frozen=True)
class Analysis:
    """One analysis of the study.

    Attributes:
        name: its name (its folder under each model, its ``--analyses`` name).
        compute: runs it: a :class:`Context` to named tables.
        settings: the settings that determine its numbers, from the study's config.
        tokens: which batch it reads: ``"main"``, ``"heavy"`` or ``"none"`` (weights or prompts).
        figures: its figures for a study's results (none where the study has no result of it).
        fast: part of the ``fast`` selection (one forward pass or the weights, plus the sweep).
        default: part of a default study (``all``).
        bridge: runs on the ``TransformerBridge`` backend (every built-in analysis does; an
            analysis registered with ``False`` needs a ``HookedTransformer``, and a study on the
            Bridge leaves it out and says so).
        split: ``compute`` can run on shards of its token batch (``ctx.tokens`` or ``ctx.heavy``
            is then one shard, ``ctx.first_sequence`` its first sequence's number) and returns
            additive tables (sums and counts per sequence, never means); ``finish`` pools the
            shards' tables. A distributed study splits only these (docs/distributed/).
        finish: puts the tables of the analysis' tasks together (one task unless ``split``), and
            may add what it reads from the finished analyses before it (``Finishing.done``):
            cheap, and without the model. Default: the one task's tables as they are.
        needs: analyses whose finished results ``compute`` reads from ``ctx.done`` (when they are
            part of the study): a distributed study finishes them first, and a ``--shard`` run
            keeps them in the same shard. They must not be ``split``.
    """

    name: str
    compute: Callable[[Context], Tables]
    settings: Callable[[StudyConfig], dict[str, Any]] = lambda config: {}
    tokens: Literal["main", "heavy", "none"] = "main"
    figures: Callable[[Study, Style], list[Figure]] = lambda study, style: []
    fast: bool = False
    default: bool = True
    bridge: bool = True
    split: bool = False
    finish: Callable[[list[Tables], Finishing], Tables] = whole
    needs: tuple[str, ...] = ()


REGISTRY: dict[str, Analysis] = {}
"""Every analysis the study knows, by name, in the order a study runs them."""


def register(analysis: Analysis, *, replace: bool = False) -> Analysis:
    """Add ``analysis`` to :data:`REGISTRY` (after the ones there); a taken name is refused
    unless ``replace``.

    Example:
        >>> a = register(Analysis("demo_count", lambda ctx: {"n": pd.DataFrame({"n": [len(ctx.tokens)]})},
        ...                       default=False))
        >>> "demo_count" in REGISTRY
        True
        >>> _ = REGISTRY.pop("demo_count")
    """
    if not isinstance(analysis, Analysis):
        raise TypeError(f"register takes an Analysis, got {type(analysis).__name__}")
    if analysis.name in REGISTRY and not replace:
        raise ValueError(f"an analysis named {analysis.name!r} is registered already (pass replace=True to replace it)")
    if analysis.tokens not in ("main", "heavy", "none"):
        raise ValueError(f"tokens must be 'main', 'heavy' or 'none', got {analysis.tokens!r}")
    if analysis.split and analysis.tokens == "none":
        raise ValueError(f"{analysis.name}: a split analysis reads a token batch (tokens 'main' or 'heavy'), not 'none'")
    for need in analysis.needs:
        if need not in REGISTRY or REGISTRY[need].split:
            raise ValueError(f"{analysis.name} needs {need!r}, which is not an analysis registered before it "
                             "that runs as one task (needs name earlier analyses that are not split)")
    REGISTRY[analysis.name] = analysis
    return analysis


def tables_of(study: Study, analysis: str, key: str) -> list[pd.DataFrame]:
    """Table ``key`` of ``analysis`` for every model of the study that has it, in model order."""
    return [done[analysis].tables[key] for done in study.results.values()
            if analysis in done and key in done[analysis].tables]


def _one(name: str, title: str, analysis: str, key: str, draw: Callable[[list[pd.DataFrame], Style], Any],
         read: Callable[[Study], str]) -> Callable[[Study, Style], list[Figure]]:
    """The figures callable of an analysis drawn as one figure of one table per model."""
    def figures(study: Study, style: Style) -> list[Figure]:
        tables = tables_of(study, analysis, key)
        return [Figure(name, title, lambda: draw(tables, style), lambda: read(study))] if tables else []
    return figures


# --------------------------------------------------------------------------- the paper's analyses
def _robustness(ctx: Context) -> Tables:
    """The sweep's additive part on ``ctx.tokens`` (the whole batch, or one shard of it)."""
    from stages_of_inference.interventions.checkpoint import CheckpointMismatchError
    from stages_of_inference.robustness import sweep_partial

    def sweep() -> Tables:
        return sweep_partial(ctx.model, ctx.tokens, first_sequence=ctx.first_sequence, per_token=True,
                             progress=ctx.progress, batch_size=ctx.config.batch_size, checkpoint_dir=ctx.work_dir,
                             precision=ctx.config.precision, layer_effects=True)
    try:
        return sweep()
    except CheckpointMismatchError:  # another sweep's checkpoint: start over
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
        return sweep()


def _robustness_finish(parts: list[Tables], fin: Finishing) -> Tables:
    from stages_of_inference.robustness import finish_sweep

    return dict(finish_sweep(parts).tables)


def _robustness_figures(study: Study, style: Style) -> list[Figure]:
    from stages_of_inference import plots

    sweeps = [done["robustness"] for done in study.results.values() if "robustness" in done]
    if not sweeps:
        return []
    out = [Figure("robustness", "Deleting and swapping blocks",
                  lambda: plots.robustness(sweeps, stages=style.stages, colors=style.colors),
                  lambda: rd.read_robustness(study))]
    effects = tables_of(study, "robustness", "layer_effects")
    if effects:
        out.append(Figure("layer_effects", "Beyond the paper: the layer-effect matrix",
                          lambda: _plot("layer_effects")(effects, style), lambda: rd.read_layer_effects(study)))
    return out


def _attention(ctx: Context) -> Tables:
    from stages_of_inference.stages import detokenization as detok

    return {"attention": detok.previous_token_attention(ctx.model, ctx.tokens, k=ctx.config.k,
                                                        batch_size=ctx.config.batch_size, progress=ctx.progress,
                                                        precision=ctx.config.precision)}


def _subjoiner(ctx: Context) -> Tables:
    from stages_of_inference.stages import detokenization as detok

    # prompts come from the start of each document: scanning all of a long corpus costs more
    # than the forward passes, and a few hundred thousand words hold plenty of candidates
    texts = [t[:SUBJOINER_CHARS] for t in _corpus_texts(ctx.config.corpus)]
    result = detok.subjoiner_heads(ctx.model, texts, max_prompts=ctx.config.subjoiner_prompts, seed=ctx.config.seed,
                                   progress=ctx.progress, precision=ctx.config.precision)
    patterns = detok.pattern_table(result)
    return {"heads": result.heads, "patterns": patterns}


def _subjoiner_figures(study: Study, style: Style) -> list[Figure]:
    from stages_of_inference import plots
    from stages_of_inference.study.run import slug

    heads = tables_of(study, "subjoiner_heads", "heads")
    if not heads:
        return []
    out = [Figure("subjoiner_scores", "Stage 1: subjoiner heads",
                  lambda: plots.subjoiner_scores(heads, stages=style.stages, colors=style.colors),
                  lambda: rd.read_subjoiner(study))]
    for name, done in study.results.items():
        if "subjoiner_heads" in done:
            patterns, top = done["subjoiner_heads"]["patterns"], done["subjoiner_heads"]["heads"]
            out.append(Figure(f"subjoiner_patterns_{slug(name)}", f"Stage 1: subjoiner attention patterns ({name})",
                              lambda p=patterns, h=top: plots.subjoiner_patterns(p, top=3, ranked=h),
                              lambda n=name, p=patterns, h=top: rd.read_patterns(n, p, h)))
    return out


def _corpus_texts(corpus: str) -> list[str]:
    from stages_of_inference.data import corpus_names, corpus_texts

    if corpus in corpus_names():
        return corpus_texts(corpus)
    path = Path(corpus)
    if path.is_dir():
        return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(path.glob("*.txt"))]
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")]
    raise FileNotFoundError(f"corpus {corpus!r} is neither a bundled corpus nor a text file or folder")


def _lens(ctx: Context) -> Tables:
    from stages_of_inference.stages import feature_engineering as fe

    # the lens and the prediction depth of every token come from the same pass, per convention
    passes = [fe.lens_with_depth(ctx.model, ctx.heavy, convention=c, batch_size=ctx.config.batch_size,
                                 progress=ctx.progress, precision=ctx.config.precision)
              for c in ("paper", "per_layer_norm")]
    out = {}
    for key, tables in zip(("lens", "depth", "depth_summary"), zip(*passes)):
        out[key] = pd.concat(tables, ignore_index=True)
        out[key].attrs["provenance"] = tables[0].attrs["provenance"]
    return out


def _lens_figures(study: Study, style: Style) -> list[Figure]:
    out = _one("logit_lens", "Stage 2: the logit lens", "logit_lens", "lens", _plot("logit_lens"), rd.read_lens)(study, style)
    depth = tables_of(study, "logit_lens", "depth")
    if depth:
        out.append(Figure("prediction_depth", "Beyond the paper: prediction depth",
                          lambda: _plot("prediction_depth")(depth, style), lambda: rd.read_depth(study)))
    return out


def _similarity(ctx: Context) -> Tables:
    from stages_of_inference.stages import feature_engineering as fe

    return {"similarity": fe.layer_similarity(ctx.model, ctx.tokens, method="cka", batch_size=ctx.config.batch_size,
                                              progress=ctx.progress, precision=ctx.config.precision)}


def _probes(ctx: Context) -> Tables:
    from stages_of_inference.stages import feature_engineering as fe

    return {"probes": fe.probe_layers(ctx.model, ctx.tokens, ctx.config.probe_label, seed=ctx.config.seed,
                                      batch_size=ctx.config.batch_size, progress=ctx.progress,
                                      precision=ctx.config.precision)}


def _neurons(ctx: Context) -> Tables:
    from stages_of_inference.stages import prediction_ensembling as pe

    moments = pe.neuron_moments(ctx.model, ctx.config.kurtosis_threshold, progress=ctx.progress)
    return {"counts": pe.neuron_counts(moments, n_layers=ctx.model.cfg.n_layers), "moments": moments}


def _sharpening(ctx: Context) -> Tables:
    from stages_of_inference.stages import residual_sharpening as rs

    done, bs, precision = ctx.done, ctx.config.batch_size, ctx.config.precision
    moments = done["neurons"]["moments"] if "neurons" in done else True
    lens = done["logit_lens"]["lens"] if "logit_lens" in done else None  # same heavy tokens: read, not redone
    profile = rs.sharpening_profile(ctx.model, ctx.heavy, moments=moments, kurtosis_threshold=ctx.config.kurtosis_threshold,
                                    lens=lens, batch_size=bs, progress=ctx.progress, precision=precision)
    ablation = rs.final_block_ablation(ctx.model, ctx.heavy, last_k=(1, 2, 3), batch_size=bs, progress=ctx.progress,
                                       precision=precision)
    return {"profile": profile, "final_blocks": ablation}


def _repetition(ctx: Context) -> Tables:
    """Every block run twice in place, one block at a time, as one prefix-sharing engine sweep."""
    from stages_of_inference._utils import relative_depth
    from stages_of_inference.interventions.executor import evaluate_plans
    from stages_of_inference.interventions.plan import LayerPlan
    from stages_of_inference.results import provenance, with_provenance

    model, tokens = ctx.model, ctx.heavy
    n = model.cfg.n_layers
    plans = [LayerPlan.identity(n)] + [LayerPlan.repeat(n, [i], times=2) for i in range(n)]
    summary = evaluate_plans(model, tokens.tokens, plans, batch_size=ctx.config.batch_size, progress=ctx.progress,
                             precision=ctx.config.precision)
    ref = summary.attrs["reference"]
    rows = summary.iloc[1:].reset_index(drop=True)
    df = pd.DataFrame({
        "layer": np.arange(n, dtype=np.int64),
        "relative_depth": [relative_depth(i, n) for i in range(n)],
        "entropy_bits": rows["entropy_bits"].to_numpy(),
        "entropy_change_bits": rows["entropy_bits"].to_numpy() - ref["entropy_bits"],
        "kl_nats": rows["kl_nats"].to_numpy(),
        "loss_delta": rows["loss_delta"].to_numpy(),
        "relative_accuracy": rows["relative_accuracy"].to_numpy(),
        "plan": rows["plan"].to_numpy(),
    })
    return {"repetition": with_provenance(df, provenance(model, tokens, analysis="layer_repetition", times=2,
                                                         blocks="each block alone", reference=ref,
                                                         precision=ctx.config.precision))}


def _plot(name: str) -> Callable[[list[pd.DataFrame], Style], Any]:
    """A ``plots`` function drawing one table per model with the study's bands and colours."""
    def draw(tables: list[pd.DataFrame], style: Style) -> Any:
        from stages_of_inference import plots

        return getattr(plots, name)(tables, stages=style.stages, colors=style.colors)
    return draw


def _neuron_plot(tables: list[pd.DataFrame], style: Style) -> Any:
    from stages_of_inference import plots

    return plots.neuron_counts(tables, share=len(tables) > 1, stages=style.stages, colors=style.colors)


def _similarity_plot(tables: list[pd.DataFrame], style: Style) -> Any:
    from stages_of_inference import plots

    return plots.layer_similarity(tables)


def _batch(config: StudyConfig) -> dict[str, Any]:
    return {"batch_size": config.batch_size, "precision": config.precision}


def _heavy(config: StudyConfig) -> dict[str, Any]:
    return {"sequences": config.heavy_sequences, "batch_size": config.batch_size, "precision": config.precision}


register(Analysis(
    "robustness", _robustness,
    lambda c: {"kinds": ["drop", "swap"], "per_token": True, "layer_effects": True, **_batch(c)},
    figures=_robustness_figures, fast=True, split=True, finish=_robustness_finish))
register(Analysis(
    "previous_token_attention", _attention, lambda c: {"k": c.k, **_batch(c)},
    figures=_one("previous_token_attention", "Stage 1: attention to the previous tokens", "previous_token_attention",
                 "attention", _plot("previous_token_attention"), rd.read_attention), fast=True))
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
    figures=_one("layer_similarity", "Stage 2: similarity of the blocks", "layer_similarity", "similarity",
                 _similarity_plot, rd.read_similarity), fast=True))
register(Analysis(
    "probes", _probes, lambda c: {"label": c.probe_label, "seed": c.seed, **_batch(c)},
    figures=_one("probes", "Stage 2: probes", "probes", "probes", _plot("probe_accuracy"), rd.read_probes)))
register(Analysis(
    "neurons", _neurons, lambda c: {"kurtosis_threshold": c.kurtosis_threshold}, tokens="none",
    figures=_one("neuron_counts", "Stage 3: prediction and suppression neurons", "neurons", "counts", _neuron_plot,
                 rd.read_neurons), fast=True))
register(Analysis(
    "sharpening", _sharpening,
    lambda c: {"convention": "per_layer_norm", "kurtosis_threshold": c.kurtosis_threshold, "last_k": [1, 2, 3],
               **_heavy(c)},
    tokens="heavy", needs=("neurons", "logit_lens"),
    figures=_one("sharpening", "Stage 4: residual sharpening", "sharpening", "profile", _plot("sharpening_profile"),
                 rd.read_sharpening)))
register(Analysis(
    "repetition", _repetition, lambda c: {"times": 2, "blocks": "each block alone", **_heavy(c)}, tokens="heavy",
    figures=_one("repetition", "Stage 4: layer repetition", "repetition", "repetition", _plot("layer_repetition"),
                 rd.read_repetition)))

PAPER_ANALYSES = tuple(REGISTRY)
"""The analyses of the paper, in the order a study runs them."""


# --------------------------------------------------------------------------- beyond the paper
def _sinks(ctx: Context) -> Tables:
    from stages_of_inference.stages import sinks

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
    from stages_of_inference.stages import task_damage as td

    config = ctx.config
    if config.cloze_file is not None:
        items = td.load_cloze_items(config.cloze_file)
    else:
        items = td.cloze_items([t[:SUBJOINER_CHARS] for t in _corpus_texts(config.corpus)], n_items=config.cloze_items,
                               seed=config.seed, context_chars=CLOZE_CONTEXT_CHARS)
    prompts = ctx.tokens.tokens[: config.generation_prompts, :GENERATION_PROMPT_TOKENS]
    # with the sweep in the study, the paper's token-level accuracy is read from it (finish), not measured again
    later = "robustness" in config.analyses
    return {"task": td.task_damage(ctx.model, items, prompts, context_tokens=CLOZE_CONTEXT_TOKENS, new_tokens=NEW_TOKENS,
                                   batch_size=config.batch_size, progress=ctx.progress, precision=config.precision,
                                   token_level=False if later else None)}


def _task_finish(parts: list[Tables], fin: Finishing) -> Tables:
    from stages_of_inference.stages import task_damage as td

    tables = whole(parts, fin)
    if "robustness" not in fin.config.analyses:
        return tables
    if "robustness" not in fin.done:
        raise ValueError("the task analysis reads its token-level accuracy from the robustness sweep, "
                         "which this model's study has not finished")
    return {"task": td.with_token_level(tables["task"], fin.done["robustness"]["summary"])}


def _task_settings(c: StudyConfig) -> dict[str, Any]:
    from stages_of_inference._utils import file_sha256

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
                   lambda: _plot("task_damage")(tables, style), lambda: rd.read_task(study, sweeps))]


SUBLAYER_KINDS = ("drop_attention", "drop_mlp")
"""The sublayer deletions the study sweeps (on the heavy batch: each costs as much as a block deletion)."""
SUBLAYER_POSITIONS = 64
"""The sublayer deletions run on the first this many tokens of each heavy sequence (half of the
default window: the default study's time budget; attention is causal, so the whole-block deletions
on the same tokens are read from the main sweep's per-token table)."""


def _sublayer_positions(config: StudyConfig) -> int:
    return min(SUBLAYER_POSITIONS, config.seq_len)


def _sublayers(ctx: Context) -> Tables:
    """Every block's attention alone and MLP alone deleted, on the start of each heavy sequence;
    beside them the whole-block deletions on the same tokens, read from the robustness sweep's
    per-token table (a prefix of a sequence gives its positions the same predictions: causal).
    """
    from stages_of_inference.robustness import robustness_sweep

    n_pos = _sublayer_positions(ctx.config)
    tokens = replace(ctx.heavy, tokens=ctx.heavy.tokens[:, :n_pos])
    result = robustness_sweep(ctx.model, tokens, kinds=SUBLAYER_KINDS, progress=ctx.progress,
                              batch_size=ctx.config.batch_size, precision=ctx.config.precision)
    return dict(result.tables)


def _sublayers_finish(parts: list[Tables], fin: Finishing) -> Tables:
    """The sublayer sweep, and the robustness sweep's whole-block deletions on the same tokens."""
    from stages_of_inference.robustness import summary_on

    tables = dict(whole(parts, fin))
    sweep = fin.done.get("robustness")
    if sweep is not None and "per_token" in sweep.tables:
        n_pos, n_seq = _sublayer_positions(fin.config), fin.config.heavy_sequences
        record = tables["summary"].attrs.get("provenance", {})
        per_token = sweep["per_token"]
        same = per_token[per_token["position"] <= n_pos - 2]  # the positions scored in the prefix
        blocks = summary_on(same, range(n_seq), int(record["model"]["n_layers"]))
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
                   lambda: _plot("sublayer_deletion")(tables, style), lambda: rd.read_sublayers(study))]


def _with_blocks(summary: pd.DataFrame, blocks: pd.DataFrame | None) -> pd.DataFrame:
    """The sublayer summary with the whole-block deletions on the same sequences appended."""
    if blocks is None:
        return summary
    out = pd.concat([summary, blocks[[c for c in blocks.columns if c in summary.columns]]], ignore_index=True)
    out.attrs = summary.attrs
    return out


register(Analysis(
    "task", _task, _task_settings, figures=_task_figures, finish=_task_finish))
register(Analysis(
    "sublayers", _sublayers, lambda c: {"kinds": list(SUBLAYER_KINDS), "positions": _sublayer_positions(c), **_heavy(c)},
    tokens="heavy", finish=_sublayers_finish,
    figures=_sublayer_figures))
register(Analysis(
    "sinks", _sinks, _batch,
    figures=_one("sink_profile", "Beyond the paper: attention sinks, massive activations, residual norms", "sinks",
                 "profile", _plot("sink_profile"), rd.read_sinks), fast=True))


def default_analyses() -> tuple[str, ...]:
    """What ``--analyses all`` (and a default study) runs: every registered analysis marked default."""
    return tuple(name for name, a in REGISTRY.items() if a.default)


def fast_analyses() -> tuple[str, ...]:
    """A cheap subset (one forward pass each, or the weights only, plus the sweep) for quick checks."""
    return tuple(name for name, a in REGISTRY.items() if a.fast)
