"""The report's written readings: one short paragraph per figure, from the study's results."""

from __future__ import annotations

import html
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from stages_of_inference.interventions.deviation import CRITERIA, PrecisionCheck
from stages_of_inference.robustness import MIDDLE
from stages_of_inference.stages.competing import TRUSTED
from stages_of_inference.stages.placement import AGREEMENT, first_peak, mlp_takes_over, stage_signals
from stages_of_inference.study.registry import Study

__all__ = ["named_tables", "read_attention", "read_competing", "read_contiguous", "read_lens", "read_neurons", "read_patterns", "read_precision", "read_probes",
    "read_layer_effects", "read_repetition", "read_robustness", "read_signals", "read_sublayers", "read_sinks", "read_depth", "read_task", "read_sharpening", "read_similarity", "read_stages", "read_subjoiner"]


def named_tables(study: Study, analysis: str, key: str) -> Iterator[tuple[str, pd.DataFrame]]:
    """``(model name, table)`` of table ``key`` of ``analysis``, for every model that has it."""
    for name, done in study.results.items():
        if analysis in done and key in done[analysis].tables:
            yield name, done[analysis].tables[key]


def _fmt(x: float, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def read_robustness(study: Study) -> str:
    """Which deletions and swaps hurt, and how much, per model."""
    parts = []
    for name, done in study.results.items():
        if "robustness" not in done:
            continue
        s = done["robustness"]["summary"]
        base = s[s["kind"] == "none"].iloc[0]
        drops, swaps = s[s["kind"] == "drop"], s[s["kind"] == "swap"]
        worst = drops.loc[drops["kl_nats"].idxmax()]
        n = len(drops)
        mid = drops[(drops["relative_depth"] >= 1 / 3) & (drops["relative_depth"] < 2 / 3)]
        last = drops.iloc[-1]
        text = (f"<b>{html.escape(name)}</b>: the unmodified model has loss {_fmt(base['loss'])} nats and top-1 accuracy "
                f"{_fmt(100 * base['accuracy'], 1)} %. Deleting block {int(worst['layer'])} (relative depth "
                f"{_fmt(worst['relative_depth'])}) does the most damage: KL {_fmt(worst['kl_nats'])} nats, "
                f"{_fmt(100 * worst['relative_accuracy'], 0)} % of the accuracy retained. ")
        if len(mid):
            text += (f"Deleting one of the middle third's {len(mid)} blocks costs on average KL {_fmt(mid['kl_nats'].mean())} "
                     f"nats and keeps {_fmt(100 * mid['relative_accuracy'].mean(), 0)} % of the accuracy; ")
        text += (f"the last block (block {n - 1}) costs KL {_fmt(last['kl_nats'])} nats "
                 f"({_fmt(100 * last['relative_accuracy'], 0)} % retained). ")
        text += (f"Over all blocks, a deletion keeps {_fmt(100 * drops['relative_accuracy'].min(), 0)}–"
                 f"{_fmt(100 * drops['relative_accuracy'].max(), 0)} % of the accuracy (the paper: 72–95 % on its models, "
                 "its first block excepted). ")
        if len(swaps):
            rel = "less" if swaps["kl_nats"].mean() < drops["kl_nats"].mean() else "more"
            text += (f"Swapping adjacent blocks hurts {rel} than deleting on average (mean KL {_fmt(swaps['kl_nats'].mean())} "
                     f"vs {_fmt(drops['kl_nats'].mean())} nats).")
        parts.append(text)
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def read_attention(study: Study) -> str:
    """Where attention to the previous tokens peaks, per model."""
    parts = []
    for name, df in named_tables(study, "previous_token_attention", "attention"):

        df = df.sort_values("layer")
        peak = df.loc[df["mean_attention"].idxmax()]
        first = first_peak(df["layer"].to_numpy(int), df["mean_attention"].to_numpy(float))
        first_row = df[df["layer"] == first].iloc[0]
        late = df[df["relative_depth"] >= 2 / 3]["mean_attention"].mean()
        parts.append(f"<b>{html.escape(name)}</b>: the mean attention weight on each of the previous {int(df['k'].iloc[0])} "
                     f"tokens has its first peak at block {first} (relative depth {_fmt(first_row['relative_depth'])}, "
                     f"{_fmt(first_row['mean_attention'], 3)}) and its highest value at block {int(peak['layer'])} "
                     f"(relative depth {_fmt(peak['relative_depth'])}, {_fmt(peak['mean_attention'], 3)}); it averages "
                     f"{_fmt(late, 3)} over the last third (the paper, GPT-2 small: about 0.10 at depth 0.18, 0.02–0.03 "
                     "late).")
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def read_subjoiner(study: Study) -> str:
    """The best subjoiner head and how many heads beat their control, per model."""
    parts = []
    for name, df in named_tables(study, "subjoiner_heads", "heads"):
        top = df.sort_values("difference", ascending=False).iloc[0]
        strong = int((df["z"] > 3).sum()) if "z" in df else 0
        parts.append(f"<b>{html.escape(name)}</b>: the best subjoiner head is L{int(top['layer'])}H{int(top['head'])} "
                     f"(relative depth {_fmt(top['relative_depth'])}): from a four-piece word's last piece it puts "
                     f"{_fmt(top['score'], 3)} of its attention on the word's earlier pieces, against "
                     f"{_fmt(top['control_score'], 3)} on the same positions in control prompts. {strong} heads beat "
                     f"their control by more than three standard errors ({int(top.get('n_prompts', 0))} prompts of each kind).")
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def read_patterns(name: str, patterns: pd.DataFrame, heads: pd.DataFrame | None) -> str:
    """How to read one model's subjoiner attention patterns."""
    n_pieces = int(patterns["n_pieces"].iloc[0]) if "n_pieces" in patterns.columns else 4
    if heads is None or heads.empty:
        return ""
    top = heads.sort_values("difference", ascending=False).iloc[0]
    return (f"<p><b>{html.escape(name)}</b>: mean attention over the prompts, rows the attending (query) position and "
            f"columns the attended (key) position, both counted from the prompt's end; the final word's {n_pieces} "
            f"pieces are the last {n_pieces} positions. A subjoiner head such as L{int(top['layer'])}H{int(top['head'])} "
            "attends from each piece of a split word to the piece before it inside the word, and does not in the "
            "controls, whose last positions belong to different words.</p>")


def read_lens(study: Study) -> str:
    """The logit-lens entropy and KL at the embeddings, half depth and the output, in both conventions."""
    parts = []
    for name, df in named_tables(study, "logit_lens", "lens"):
        pieces = []
        for convention, label in (("paper", "paper convention"), ("per_layer_norm", "per-layer norm")):
            part = df[df["convention"] == convention].sort_values("layer")
            if part.empty:
                continue
            h = part["entropy_bits"].to_numpy()
            half = part.iloc[len(part) // 2]
            pieces.append(f"with the {label}, entropy is {_fmt(h[0], 1)} bits at the embeddings, "
                          f"{_fmt(half['entropy_bits'], 1)} at half depth and {_fmt(h[-1], 1)} at the output; "
                          f"KL to the output at half depth is {_fmt(half['kl_to_final_nats'], 1)} nats")
        parts.append(f"<b>{html.escape(name)}</b>: " + "; ".join(pieces) + ".")
    return ("<p>" + "</p><p>".join(parts) + "</p><p>The two conventions tell different stories (docs: the logit "
            "lens): dividing every layer by the final norm's scale keeps early layers near-uniform, while "
            "normalising each by its own statistics makes them look sharp.</p>") if parts else ""


def read_similarity(study: Study) -> str:
    """How alike neighbouring blocks' outputs are (CKA), by third of the depth."""
    parts = []
    for name, df in named_tables(study, "layer_similarity", "similarity"):
        grid = df.pivot(index="layer_a", columns="layer_b", values="similarity").to_numpy()
        n = grid.shape[0]
        neighbours = np.array([grid[i, i + 1] for i in range(n - 1)])
        third = max(1, n // 3)
        parts.append(f"<b>{html.escape(name)}</b>: neighbouring blocks' outputs have CKA {_fmt(neighbours[third:n - third].mean())} "
                     f"on average in the middle third, {_fmt(neighbours[:third].mean())} in the first third and "
                     f"{_fmt(neighbours[n - third - 1:].mean())} in the last; block 0 and the last block have CKA "
                     f"{_fmt(grid[0, -1])}.")
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def read_probes(study: Study) -> str:
    """Where the probe is most accurate, against the majority class."""
    parts = []
    for name, df in named_tables(study, "probes", "probes"):
        best = df.loc[df["accuracy"].idxmax()]
        parts.append(f"<b>{html.escape(name)}</b>: a linear probe for “{html.escape(str(best['label']))}” reaches "
                     f"{_fmt(100 * best['accuracy'], 1)} % held-out accuracy at readout {int(best['layer'])} (relative depth "
                     f"{_fmt(best['relative_depth'])}), against {_fmt(100 * best['baseline'], 1)} % for the majority class; "
                     f"{_fmt(100 * df['accuracy'].iloc[0], 1)} % on the embeddings.")
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def read_neurons(study: Study) -> str:
    """How many prediction and suppression neurons, and where they peak."""
    parts = []
    for name, df in named_tables(study, "neurons", "counts"):
        total_p, total_s = int(df["n_prediction"].sum()), int(df["n_suppression"].sum())
        if total_p + total_s == 0:
            moments = study.results.get(name, {}).get("neurons")
            moments = moments.tables.get("moments") if moments is not None else None
            text = f"<b>{html.escape(name)}</b>: no neuron passes the kurtosis threshold"
            if moments is not None and len(moments):
                top = moments.loc[moments["vocab_kurt"].idxmax()]
                text += (f"; the highest vocabulary kurtosis is {_fmt(float(top['vocab_kurt']), 1)} (block {int(top['layer'])}, "
                         f"neuron {int(top['neuron'])}, skew {_fmt(float(top['vocab_skew']))})")
            parts.append(text + ".")
            continue
        cum = df["n_prediction"].cumsum() / max(total_p, 1)
        first_half = int(df[df["relative_depth"] < 0.5]["n_prediction"].sum()) if total_p else 0
        peak_p = df.loc[df["n_prediction"].idxmax()]
        peak_s = df.loc[df["n_suppression"].idxmax()]
        parts.append(f"<b>{html.escape(name)}</b>: {total_p} prediction and {total_s} suppression neurons; "
                     f"{first_half} of the prediction neurons lie in the first half of the depth "
                     f"(half of them by block {int(df['layer'][cum >= 0.5].iloc[0]) if total_p else 'n/a'}). "
                     f"Prediction neurons peak at block {int(peak_p['layer'])} ({int(peak_p['n_prediction'])}), "
                     f"suppression neurons at block {int(peak_s['layer'])} ({int(peak_s['n_suppression'])}).")
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def read_sharpening(study: Study) -> str:
    """What the last block does to entropy and confidence, and which block sharpens most."""
    parts = []
    for name, done in study.results.items():
        if "sharpening" not in done:
            continue
        prof = done["sharpening"]["profile"]
        last = prof.iloc[-1]
        sharpest = prof.loc[prof["entropy_change_bits"].idxmin()]
        text = (f"<b>{html.escape(name)}</b>: the last block changes the output entropy by "
                f"{_fmt(last['entropy_change_bits'])} bits ({'sharpens' if last['entropy_change_bits'] < 0 else 'flattens: it calibrates rather than sharpens'}) "
                f"and top-1 confidence by {_fmt(last['confidence_change'], 3)}; block {int(sharpest['layer'])} sharpens most "
                f"({_fmt(sharpest['entropy_change_bits'])} bits). ")
        fb = done["sharpening"].tables.get("final_blocks")
        if fb is not None and len(fb) > 1:
            one = fb[(fb["kind"] == "last_k") & (fb["k"] == 1)]
            if len(one):
                r = one.iloc[0]
                text += (f"Deleting the last block moves the output entropy by {_fmt(r['entropy_change_bits'])} bits, the "
                         f"calibration error by {_fmt(r['ece_change'], 3)} and the loss by {_fmt(r['loss_delta'])} nats.")
        parts.append(text)
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def read_repetition(study: Study) -> str:
    """What running a block twice costs."""
    parts = []
    for name, df in named_tables(study, "repetition", "repetition"):
        worst = df.loc[df["kl_nats"].idxmax()]
        mid = df[(df["relative_depth"] >= 1 / 3) & (df["relative_depth"] < 2 / 3)]
        parts.append(f"<b>{html.escape(name)}</b>: running block {int(worst['layer'])} twice costs the most (KL "
                     f"{_fmt(worst['kl_nats'])} nats, entropy change {_fmt(worst['entropy_change_bits'])} bits); repeating a "
                     f"middle-third block costs KL {_fmt(mid['kl_nats'].mean())} nats on average and changes the output "
                     f"entropy by {_fmt(mid['entropy_change_bits'].mean())} bits.")
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def read_stages(study: Study) -> str:
    """Where the rule places the four stages on each model, with its evidence."""
    parts = []
    for name, table in study.stages.items():
        if table is None or table.empty:
            continue
        spans = []
        for _, r in table.iterrows():
            if r["n_blocks"] > 0:
                blocks = f"block {r['first_layer']}" if r["n_blocks"] == 1 else f"blocks {r['first_layer']}–{r['last_layer']}"
                low, high = (r.get("first_layer_low"), r.get("first_layer_high"))
                sure = ("" if low is None or r["first_layer"] <= 0 else _resampled_start(int(low), int(high)))
                spans.append(f"{r['stage']}: {blocks} (depth {_fmt(r['start'])}–{_fmt(r['end'])}{sure}; "
                             f"{html.escape(str(r['evidence']))})")
            else:
                spans.append(f"{r['stage']}: no block")
        parts.append(f"<b>{html.escape(name)}</b>: " + "; ".join(spans) + "." + _lens_moves(table))
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def _resampled_start(low: int, high: int) -> str:
    """Where a stage starts in 90 % of the resamples; -1 is a resample in which it got no block.

    Example:
        >>> _resampled_start(13, 15), _resampled_start(-1, 15), _resampled_start(-1, -1)
        ('; starts at a block in 13–15 in 90 % of resamples', '; in 90 % of resamples it gets no block or starts at a block up to 15', '; gets no block in most resamples')
    """
    if high < 0:
        return "; gets no block in most resamples"
    if low < 0:
        return f"; in 90 % of resamples it gets no block or starts at a block up to {high}"
    if low == high:
        return f"; starts at block {low} in 90 % of resamples"
    return f"; starts at a block in {low}–{high} in 90 % of resamples"


def _lens_moves(table: pd.DataFrame) -> str:
    """One sentence: whether the placement moves when the lens convention changes."""
    by_lens = table.attrs.get("by_lens") or {}
    if len(by_lens) < 2 or "lens_convention" not in table:
        return ""
    used = str(table["lens_convention"].iloc[0])
    mine = table["first_layer"].tolist()
    moved = {c: firsts for c, firsts in by_lens.items() if c != used and firsts != mine}
    if not moved:
        return (f" The rule reads the {used} lens; with the {', '.join(c for c in by_lens if c != used)} lens the "
                "placement does not move.")
    intervals = table.attrs.get("by_lens_intervals") or {}

    def moved_to(convention: str, stage: str, here: int, there: int) -> str:
        notes = []
        low, high = intervals.get(convention, {}).get(stage, (-2, -2))
        if low >= 0:
            notes.append(f"90 % interval {low}–{high}")
        elif low == -1:
            notes.append(f"in 90 % of resamples no block or a start up to {high}" if high >= 0 else
                         "no block in 90 % of resamples")
        notes.append(f"here: block {here}" if here >= 0 else "here: no block")
        where = f"would start at block {there}" if there >= 0 else "would get no block"
        return f"{stage} {where} ({'; '.join(notes)})"

    return " The rule reads the " + used + " lens; " + "; ".join(
        f"with the {c} lens " + ", ".join(moved_to(c, stage, a, b)
                                           for stage, a, b in zip(table["stage"], mine, firsts) if a != b)
        for c, firsts in moved.items()) + "."


def read_precision(study: Study) -> str:
    """Per model, whether the study's low-precision numbers can stand for fp32 ones: the sweep's own
    check (:mod:`stages_of_inference.interventions.deviation`) as one line and its table. Empty for
    an fp32 study.
    """
    if study.config.precision == "fp32":
        return ""

    parts = []
    for name, done in study.results.items():
        result = done.get("robustness")
        summary = None if result is None else result.provenance.get("precision_check")
        if summary is None:
            parts.append(f"<p><b>{html.escape(name)}</b>: no precision check (the robustness sweep did not run).</p>")
            continue
        table = result.tables["precision_check"]
        sentence = PrecisionCheck(table, summary).sentence
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                row["kind"], "" if pd.isna(row["layer"]) else int(row["layer"]),
                _fmt(row["kl_nats"], 4), _fmt(row["kl_nats_fp32"], 4), _fmt(row["loss"], 4), _fmt(row["loss_fp32"], 4),
                _fmt(row["accuracy"], 4), _fmt(row["accuracy_fp32"], 4))) + "</tr>"
            for _, row in table.iterrows())
        low = html.escape(summary["precision"])
        head = "".join(f"<th>{h}</th>" for h in ("plan", "layer", f"KL {low}", "KL fp32", f"loss {low}", "loss fp32",
                                                 f"accuracy {low}", "accuracy fp32"))
        parts.append(f"<p><b>{html.escape(name)}</b>: {html.escape(sentence)}</p><table><tr>{head}</tr>{rows}</table>")
    criteria = (f"median relative KL deviation at most {100 * CRITERIA['kl_median_rel']:.0f} %, every plan's KL within "
                f"{CRITERIA['kl_abs']} nats or {100 * CRITERIA['kl_rel']:.0f} % of itself, rank correlation of the plans' "
                f"KL at least {CRITERIA['kl_rank_correlation']}")
    return "".join(parts) + f"<p class='small'>Criteria for standing in for fp32: {criteria}.</p>"


MASSIVE_RATIO = 100.0
"""A residual activation counts as massive when it is this many times the median one (Sun et al.
report ratios in the thousands; 100 separates them from ordinary heavy tails)."""


def read_sinks(study: Study) -> str:
    """Per model: where attention to the first token and massive activations switch on, and how
    the residual norm grows.
    """
    parts = []
    for name, df in named_tables(study, "sinks", "profile"):
        df = df.sort_values("layer")
        n = len(df)
        peak = df.loc[df["sink_attention"].idxmax()]
        sinky = df[df["sink_heads_share"] >= 0.5]
        big = df.loc[df["massive_ratio"].idxmax()]
        massive = df[df["massive_ratio"] >= MASSIVE_RATIO]
        text = (f"<b>{html.escape(name)}</b>: entering block 0, heads give the first token "
                f"{_fmt(df['sink_attention'].iloc[0])} of their attention on average; the most is "
                f"{_fmt(peak['sink_attention'])} entering block {int(peak['layer'])} (relative depth "
                f"{_fmt(peak['relative_depth'])}). ")
        text += (f"{len(sinky)} of {n} blocks, the first of them block {int(sinky['layer'].iloc[0])}, have at least half "
                 "of their heads as sink heads (mean attention to the first token above 0.5). " if len(sinky)
                 else "No block has half of its heads as sink heads. ")
        text += (f"The largest residual activation, {_fmt(big['max_abs_activation'], 0)} at position "
                 f"{int(big['max_position'])}, dimension {int(big['max_dimension'])}, enters block {int(big['layer'])}: "
                 f"{_fmt(big['massive_ratio'], 0)} times the median activation. ")
        if len(massive):
            text += (f"Activations over {MASSIVE_RATIO:.0f} times the median enter {len(massive)} of the {n} blocks, "
                     f"from block {int(massive['layer'].min())} (relative depth {_fmt(massive['relative_depth'].min())}) "
                     f"to block {int(massive['layer'].max())}. ")
        else:
            text += f"No activation reaches {MASSIVE_RATIO:.0f} times the median. "
        text += (f"The mean residual norm grows from {_fmt(df['resid_norm'].iloc[0])} entering block 0 to "
                 f"{_fmt(df['resid_norm'].iloc[-1])} entering the last block (first token: "
                 f"{_fmt(df['bos_resid_norm'].iloc[0])} to {_fmt(df['bos_resid_norm'].iloc[-1])}).")
        parts.append(text)
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def read_depth(study: Study) -> str:
    """Per model: the median and mean prediction depth, for right and wrong tokens (the two lens
    conventions give the same depths; the per-layer-norm rows are read).
    """
    parts = []
    for name, df in named_tables(study, "logit_lens", "depth_summary"):
        rows = df[df["convention"] == "per_layer_norm"] if (df["convention"] == "per_layer_norm").any() else df
        row = rows.iloc[0]
        n = int(study.results[name]["logit_lens"]["depth"]["layer"].max())
        parts.append(
            f"<b>{html.escape(name)}</b>: half of the tokens' top-1 prediction has settled by readout "
            f"{int(row['median_depth'])} of {n} (relative depth {_fmt(row['median_depth'] / n)}); the mean depth is "
            f"{_fmt(row['mean_depth'], 1)} readouts, {_fmt(row['mean_depth_right'], 1)} for the {int(row['n_right'])} "
            f"tokens the model gets right and {_fmt(row['mean_depth_wrong'], 1)} for the "
            f"{int(row['n_tokens'] - row['n_right'])} it gets wrong"
            + (": correct predictions settle earlier." if row["mean_depth_right"] < row["mean_depth_wrong"] else "."))
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def read_tuned(study: Study) -> str:
    """Per model: the KL to the output at a quarter, half and three quarters of the depth under each
    lens, and the median prediction depth under each.
    """
    labels = {"tuned": "tuned lens", "jacobian": "Jacobian lens", "per_layer_norm": "logit lens (per-layer norm)",
              "paper": "logit lens (paper)"}
    parts = []
    for name, done in study.results.items():
        found = [a for a in ("logit_lens", "tuned_lens", "jacobian_lens") if a in done]
        if not {"tuned_lens", "jacobian_lens"} & set(found):
            continue
        lenses = pd.concat([done[a]["lens"] for a in found], ignore_index=True)
        n = int(lenses["layer"].max())
        at = [round(n * f) for f in (0.25, 0.5, 0.75)]
        kls = []
        for convention, label in labels.items():
            rows = lenses[lenses["convention"] == convention].set_index("layer")
            if len(rows):
                kls.append(f"{label} " + " / ".join(_fmt(rows.loc[k, "kl_to_final_nats"], 2) for k in at))
        depths = [f"{int(row['median_depth'])} ({labels.get(row['convention'], row['convention'])})"
                  for a in found for _, row in done[a]["depth_summary"].iterrows()]
        parts.append(f"<b>{html.escape(name)}</b>: KL to the output at readouts {', '.join(map(str, at))} of {n}: "
                     + "; ".join(kls) + " nats. Median prediction depth (readout): " + ", ".join(depths) + ".")
    if not parts:
        return ""
    return ("<p>" + "</p><p>".join(parts) + "</p><p>The tuned lens is trained on windows of the corpus outside the "
            "study's batch (Belrose et al.'s loss, a few dozen Adam steps on a CPU), the Jacobian lens (when the study "
            "ran it) fitted on some of the same windows (docs/tuned-lens.md); the stage placement under each lens is "
            "in the stage table's line.</p>")


def read_guesses(study: Study, name: str) -> str:
    """One model's guess then refine: the share of the lens's guesses among the ten most frequent
    tokens at the embeddings, at its peak and at the output, and prediction depth by word class and
    by frequency bucket.
    """
    done = study.results[name]["guess_then_refine"]
    buckets, words, by_bucket = done["buckets"], done["words"], done["depth_by_bucket"]
    top = buckets[buckets["bucket"] == buckets["bucket"].iloc[0]].sort_values("layer")
    share = top["guess_share"].to_numpy()
    peak = int(top["layer"].iloc[int(share.argmax())])
    n = int(top["layer"].max())
    word = words.set_index("word_class")
    depth = "; ".join(f"{row['bucket']} {_fmt(row['mean_depth'], 1)}" for _, row in by_bucket.iterrows()
                      if row["n_tokens"] > 0)
    return (f"<p><b>{html.escape(name)}</b>: the ten most frequent tokens are "
            f"{_fmt(100 * share[0], 0)} % of the lens's top-1 guesses at the embeddings, {_fmt(100 * share.max(), 0)} % "
            f"at readout {peak} and {_fmt(100 * share[-1], 0)} % at the output (readout {n}). Mean prediction depth: "
            f"function words {_fmt(word.loc['function', 'mean_depth'], 1)}, content words "
            f"{_fmt(word.loc['content', 'mean_depth'], 1)} readouts; by the frequency of the predicted token: "
            f"{html.escape(depth)}.</p><p>Frequency ranks are counted over the main batch and the tuned lens's "
            "training split; the lens is the paper's convention (docs: guess then refine).</p>")


def read_task(study: Study, sweeps: dict[str, pd.DataFrame]) -> str:
    """Per model: cloze accuracy and shared continuation retained at the first, middle and last
    deletion, beside token-level accuracy retained (the main sweep's, or on the cloze sequences
    where the study ran no sweep; then the main sweep's too if one is given).
    """
    parts = []
    for name, df in named_tables(study, "task", "task"):
        base = df[df["kind"] == "none"].iloc[0]
        drops = df[df["kind"] == "drop"].sort_values("layer").reset_index(drop=True)
        picks = {"first": drops.iloc[0], "middle": drops.iloc[len(drops) // 2], "last": drops.iloc[-1]}
        from_sweep = "given sweep" in str(df.attrs.get("provenance", {}).get("settings", {}).get("token_level", ""))
        sweep = None if from_sweep else sweeps.get(name)
        said = []
        for where, row in picks.items():
            token_main = ""
            if sweep is not None:
                match = sweep[(sweep["kind"] == "drop") & (sweep["layer"] == row["layer"])]
                if len(match):
                    token_main = f", {_fmt(100 * float(match['relative_accuracy'].iloc[0]), 0)} % in the main sweep"
            said.append(f"the {where} block ({int(row['layer'])}): cloze {_fmt(100 * row['cloze_retained'], 0)} %, "
                        f"continuation {_fmt(100 * row['generation_retained'], 0)} %, token-level "
                        f"{_fmt(100 * row['token_retained'], 0)} %{token_main}")
        harder = drops[drops["cloze_retained"] < drops["token_retained"] - 0.1]
        text = (f"<b>{html.escape(name)}</b>: the unmodified model gets {_fmt(100 * base['cloze_accuracy'], 0)} % of "
                f"{int(base['n_items'])} cloze items right and continues its {int(base['n_prompts'])} prompts by "
                f"{_fmt(base['shared_tokens'], 0)} tokens. Deleting " + "; ".join(said) + " retained. ")
        text += (f"For {len(harder)} of {len(drops)} deletions the cloze task loses over 10 points more than token-level "
                 "accuracy does. " if len(harder) else "Cloze accuracy tells the same story as token-level accuracy. ")
        text += (f"On average a deletion keeps {_fmt(100 * drops['generation_retained'].mean(), 0)} % of the greedy "
                 f"continuation against {_fmt(100 * drops['token_retained'].mean(), 0)} % of token-level accuracy"
                 + (": generation shows damage that the token-level metric hides."
                    if drops["generation_retained"].mean() < drops["token_retained"].mean() - 0.1 else "."))
        if int(base["n_items"]) < 100:
            text += (f" With {int(base['n_items'])} items a cloze share moves in steps of "
                     f"{_fmt(100 / max(1, round(base['cloze_accuracy'] * base['n_items'])), 0)} points of the retained "
                     "share: read it as a sign, and run --cloze-items 256 (or --cloze-file) for an estimate.")
        parts.append(text)
    return "<p>" + "</p><p>".join(parts) + "</p>" if parts else ""


def read_layer_effects(study: Study) -> str:
    """Per model: which deleted block changes what later blocks write most, which blocks' deletion
    leaves the rest nearly as they were, and how large and aligned the blocks' contributions are.
    """
    parts = []
    for name, df in named_tables(study, "robustness", "layer_effects"):
        drops = df[df["kind"] == "drop"]
        if drops.empty:
            continue
        n = int(df["block"].max()) + 1
        per_skip = drops.groupby("layer")["relative_change"].mean()
        top = int(per_skip.idxmax())
        quiet = per_skip[per_skip.index < n - 1].nsmallest(3)
        base = df[df["kind"] == "none"].sort_values("block")
        big = base.loc[base["relative_size"].idxmax()]
        text = (f"<b>{html.escape(name)}</b>: deleting block {top} (relative depth {_fmt(top / max(n - 1, 1))}) changes "
                f"what the later blocks write most: by {_fmt(per_skip[top])} times the norm of their contribution, on "
                f"average over the blocks after it. Deleting block{'s' if len(quiet) > 1 else ''} "
                f"{', '.join(str(int(i)) for i in quiet.index)} changes the later blocks least "
                f"({', '.join(_fmt(v) for v in quiet.to_numpy())}): the blocks after them barely depend on them. ")
        text += (f"In the unmodified model the largest contribution relative to the residual it reads is block "
                 f"{int(big['block'])}'s ({_fmt(big['relative_size'])} of the residual's norm); the median block adds "
                 f"{_fmt(base['relative_size'].median())}, and contributions are nearly orthogonal to the residual "
                 f"(median cosine {_fmt(base['cosine'].median())}).")
        parts.append(f"<p>{text}</p>")
    return "".join(parts)


def read_sublayers(study: Study) -> str:
    """Per model: how much deleting only the attention or only the MLP costs, against the whole
    block, and where MLP damage overtakes attention damage.
    """
    parts = []
    for name, df in named_tables(study, "sublayers", "summary"):
        attn = df[df["kind"] == "drop_attention"].set_index("layer")["kl_nats"]
        mlp = df[df["kind"] == "drop_mlp"].set_index("layer")["kl_nats"]
        if attn.empty or mlp.empty:
            continue
        inner = [i for i in attn.index if 0 < i < len(attn) - 1]
        switch = mlp_takes_over(df)
        text = (f"<b>{html.escape(name)}</b>: over the blocks other than the first and the last, deleting only the "
                f"attention costs {_fmt(attn[inner].median())} nats of KL (median), only the MLP "
                f"{_fmt(mlp[inner].median())}; the attention is the cheaper one to lose in "
                f"{int((attn[inner] < mlp[inner]).sum())} of {len(inner)} of them. Block 0: attention "
                f"{_fmt(attn.iloc[0])}, MLP {_fmt(mlp.iloc[0])} nats. ")
        text += (f"From block {switch} on, deleting the MLP costs more than deleting the attention." if switch >= 0
                 else "Deleting the MLP never costs more than deleting the attention for two blocks running.")
        parts.append(f"<p>{text}</p>")
    return "".join(parts)


def read_signals(study: Study) -> str:
    """Per model: the boundaries the signals beyond the paper suggest, beside the rule's, as a
    table and one line saying whether they agree (:func:`~stages_of_inference.stages.placement.stage_signals`).
    """
    parts = []
    for name, table in study.stages.items():
        done = study.results.get(name, {})
        sinks = done["sinks"].tables.get("profile") if "sinks" in done else None
        depth = done["logit_lens"].tables.get("depth_summary") if "logit_lens" in done else None
        sublayers = done["sublayers"].tables.get("summary") if "sublayers" in done else None
        phases = done["competing_readings"].tables.get("phases") if "competing_readings" in done else None
        if table is None or table.empty or (sinks is None and depth is None and sublayers is None and phases is None):
            continue
        intervals = table.attrs.get("intervals")
        signals = stage_signals(table, sinks, depth, sublayers, phases, intervals)
        judged = "judged_by" in signals

        def span(layer: int, low: float, high: float) -> str:
            return "" if not judged or not np.isfinite(low) or low < 0 else f", 90 % interval {int(low)} .. {int(high)}"

        def verdict_of(r: Any) -> str:
            if not judged:
                return "yes" if r.agrees else "no"
            if r.judged_by == "intervals":
                return "yes (intervals overlap)" if r.agrees else "no (intervals apart)"
            return f"yes (within {AGREEMENT})" if r.agrees else f"no (more than {AGREEMENT} apart)"
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                r.signal, r.boundary,
                "never" if r.layer < 0 else f"block {r.layer} ({_fmt(r.relative_depth)}"
                + (span(r.layer, r.low, r.high) if judged else "") + ")",
                f"block {r.rule_layer} ({_fmt(r.rule_depth)}" + (span(r.rule_layer, r.rule_low, r.rule_high) if judged else "")
                + ")", verdict_of(r))) + "</tr>"
            for r in signals.itertuples())
        head = "".join(f"<th>{h}</th>" for h in ("signal", "suggests the start of", "where", "the rule's", "agree"))
        agree = int(signals["agrees"].sum())
        verdict = ("they agree with the rule" if agree == len(signals) else
                   f"{agree} of {len(signals)} agree with the rule")
        how = (f"by overlapping 90 % bootstrap intervals over sequences ({int(intervals['resamples'].iloc[0])} resamples) "
               f"where both have one, else within {AGREEMENT} of relative depth" if judged
               else f"within {AGREEMENT} of relative depth")
        parts.append(f"<p><b>{html.escape(name)}</b>: {verdict} ({how}).</p>"
                     f"<table><tr>{head}</tr>{rows}</table>")
    return "".join(parts)


def read_contiguous(study: Study) -> str:
    """Per model: how the damage of deleting runs of adjacent blocks grows with their length, and
    the length at which the middle of the model stops being robust
    (:func:`~stages_of_inference.robustness.run_collapse`).
    """
    parts = []
    for name, collapse in named_tables(study, "contiguous_deletions", "collapse"):
        if collapse.empty:
            continue
        steps = "; ".join(f"k = {int(r.k)}: {_fmt(r.median_kl)} nats" + (f" ({_fmt(r.additivity, 1)} times k single deletions)"
                                                                          if np.isfinite(r.additivity) else "")
                          for r in collapse.itertuples() if r.middle_runs > 0)
        broken = collapse[collapse["robust"].eq(False).fillna(False)]
        text = (f"<b>{html.escape(name)}</b>: median KL of deleting k adjacent blocks from the middle of the model "
                f"(runs within relative depth {MIDDLE[0]} .. {MIDDLE[1]}): {steps}. The threshold is the stage rule's "
                f"for one block, {_fmt(float(collapse['threshold'].iloc[0]))} nats (3 times the median single deletion). ")
        text += (f"The middle stops being robust at k = {int(broken['k'].iloc[0])}: deleting that many adjacent middle "
                 "blocks costs as much as deleting one fragile block." if len(broken) else
                 f"The middle stays robust up to the longest run measured (k = {int(collapse['k'].max())}).")
        parts.append(f"<p>{text}</p>")
    return "".join(parts)


def read_competing(study: Study) -> str:
    """Per model: Mix-Compress-Refine's phase boundaries, and how well each pruning proxy ranks
    the blocks like their measured deletion damage.
    """
    parts = []
    for name, agreement in named_tables(study, "competing_readings", "agreement"):
        done = study.results[name]["competing_readings"]
        phases = done["phases"].set_index("phase")
        readouts = done["readouts"]
        valley = readouts.loc[readouts["matrix_entropy"].idxmin()]

        def where(phase: str) -> str:
            at = int(phases.loc[phase, "readout"])
            return "never" if at < 0 else f"at block {at} (relative depth {_fmt(phases.loc[phase, 'relative_depth'])})"
        text = (f"<b>{html.escape(name)}</b>: the first token's norm jumps most entering block "
                f"{int(phases.loc['compression', 'readout'])}, so compression begins {where('compression')}; the "
                f"entropy's valley is at readout {int(valley['readout'])} ({_fmt(valley['matrix_entropy'])} of its "
                f"largest possible value), and it recovers half-way to its last value {where('refinement')}. ")
        rows = []
        for r in agreement.itertuples():
            rows.append(f"{r.proxy.replace('_', ' ')} {_fmt(r.spearman)} [{_fmt(r.low)}, {_fmt(r.high)}]")
        trusted = [r.proxy.replace("_", " ") for r in agreement.itertuples() if r.trusted]
        text += (f"Rank correlation with the KL of deleting each block (Spearman, 90 % interval, {int(agreement['n_blocks'].iloc[0])} "
                 f"blocks): {'; '.join(rows)}. ")
        text += (f"A pruning practitioner may rank this model's blocks by {', '.join(trusted)} (the interval's low end "
                 f"is above {TRUSTED})." if trusted else
                 f"No proxy's interval stays above {TRUSTED}: none ranks this model's blocks like their deletion "
                 "damage well enough to prune by.")
        parts.append(f"<p>{text}</p>")
    return "".join(parts)
