"""Stage 1, detokenization: early layers integrate local context, lifting tokens to words.

Three kinds of evidence (PAPER.md, docs/stages/detokenization.md):

* :func:`previous_token_attention` (and :func:`previous_token_attention_heads`): how much
  attention each layer puts on the previous ``k`` tokens, the paper's metric exactly;
* :func:`subjoiner_heads`: heads that, at the last piece of a word split into several tokens,
  attend to the word's earlier pieces, scored against control prompts whose last word is one token;
* :func:`first_blocks_damage`: from a robustness sweep, how much more deleting (or swapping) the
  first blocks costs than the rest.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from stages_of_inference._tl import HookedTransformer, Model
from stages_of_inference._utils import check_count, check_model, check_tokens, relative_depth
from stages_of_inference._utils import progress as _progress
from stages_of_inference.batch import Tokens
from stages_of_inference.interventions.hooks import AttentionReadout, collect
from stages_of_inference.metrics import mean_and_sem
from stages_of_inference.models import bos_token_id
from stages_of_inference.results import provenance, with_provenance

__all__ = [
    "SubjoinerResult",
    "first_blocks_damage",
    "previous_token_attention_tables",
    "pattern_table",
    "previous_token_attention",
    "previous_token_attention_heads",
    "subjoiner_heads",
]


def _tiny_model() -> HookedTransformer:  # for docstring examples
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=16, d_head=4, n_heads=2, d_vocab=11,
                                  act_fn="relu", seed=0)
    return HookedTransformer(cfg)


# --------------------------------------------------------------------------------------------
# attention to the previous k tokens


def _previous_token_per_sequence(
    model: Model, tokens: Tokens, k: int, batch_size: int, progress: bool, precision: str = "fp32"
) -> Tensor:
    """``[sequence, layer, head]`` mean of ``A_h[q, q - d]`` over ``d = 1..k`` and ``q = d .. pos - 1``."""
    model = check_model(model)
    tokens = check_tokens(model, tokens, min_len=2)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int number of previous tokens, got {type(k).__name__}")
    pos = tokens.shape[1]
    if not 1 <= k < pos:
        raise ValueError(f"k must lie in 1 .. pos - 1 = {pos - 1} (offsets need a key before the query), got {k}")
    batch_size = check_count(batch_size, "batch_size", "a positive number of sequences")
    n_entries = sum(pos - d for d in range(1, k + 1))
    out = torch.zeros(tokens.shape[0], model.cfg.n_layers, model.cfg.n_heads, dtype=torch.float64)
    offset = {"start": 0}

    def reduce(layer: int, pattern: Tensor) -> None:
        # Sub-diagonal d of [query, key] holds A[q, q - d] for q = d .. pos - 1 (BOS keys included).
        total = sum(pattern.diagonal(offset=-d, dim1=-2, dim2=-1).float().sum(-1) for d in range(1, k + 1))
        start = offset["start"]
        out[start : start + pattern.shape[0], layer] = total.cpu().double() / n_entries

    collector = AttentionReadout(reduce)
    for start in _progress(range(0, tokens.shape[0], batch_size), progress, desc="previous-token attention"):
        offset["start"] = start
        collect(model, tokens[start : start + batch_size], [collector], batch_size=batch_size, progress=False,
                precision=precision)
    return out


def previous_token_attention(
    model: Model,
    tokens: Tokens,
    k: int = 5,
    batch_size: int = 8,
    progress: bool = True,
    precision: str = "fp32",
) -> pd.DataFrame:
    """Per layer, the mean attention weight on the previous ``k`` tokens (the paper's metric).

    For each sequence and layer: the mean, over heads ``h``, offsets ``d = 1..k`` and every query
    ``q >= d``, of the single weights ``A_h[q, q - d]``, each entry weighted equally (a mean of
    single weights, not a sum over the window). Every ``q >= d`` counts, so entries whose key is
    the BOS position (``q = d``) are included, as in the authors' sub-diagonals of the full
    pattern. Then the mean over sequences and its standard error. Patterns are reduced layer by
    layer as the forward pass makes them (:class:`~stages_of_inference.interventions.hooks.AttentionReadout`);
    no pattern cache is kept.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids, BOS first.
        k: number of previous tokens, ``1 .. pos - 1`` (the paper: 5).
        batch_size: sequences per forward pass.
        progress: show a progress bar.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the dtype of the model's products and
            attention (:mod:`stages_of_inference.precision`); the patterns are read in fp32.

    Returns:
        One row per layer: ``layer``, ``relative_depth`` (``layer / (n_layers - 1)``),
        ``mean_attention``, ``sem`` (over sequences), ``k``, ``n_sequences``; provenance in
        ``attrs``. Per head: :func:`previous_token_attention_heads`.

    Example:
        >>> import torch
        >>> df = previous_token_attention(_tiny_model(), torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(0)), k=2, progress=False)
        >>> list(df.columns[:4]), len(df)
        (['layer', 'relative_depth', 'mean_attention', 'sem'], 2)
    """
    return previous_token_attention_tables(model, tokens, k, batch_size, progress, precision)["attention"]


def previous_token_attention_tables(
    model: Model,
    tokens: Tokens,
    k: int = 5,
    batch_size: int = 8,
    progress: bool = True,
    precision: str = "fp32",
) -> dict[str, pd.DataFrame]:
    """:func:`previous_token_attention` (``attention``, same arguments) and, from the same pass,
    ``per_sequence``: per ``sequence`` and ``layer`` the sequence's own ``mean_attention`` (the
    additive part a bootstrap over sequences resamples; ``attention`` is their mean).

    Example:
        >>> import torch
        >>> t = previous_token_attention_tables(_tiny_model(), torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(0)), k=2, progress=False)
        >>> per = t["per_sequence"]
        >>> len(per), bool(abs(per.groupby("layer")["mean_attention"].mean() - t["attention"]["mean_attention"]).max() < 1e-9)
        (6, True)
    """
    per_seq = _previous_token_per_sequence(model, tokens, k, batch_size, progress, precision)
    n_layers = model.cfg.n_layers
    by_layer = per_seq.mean(dim=-1)  # [sequence, layer]: mean over heads
    rows = []
    for layer in range(n_layers):
        mean, sem = mean_and_sem(by_layer[:, layer].unsqueeze(1))
        rows.append({"layer": layer, "relative_depth": relative_depth(layer, n_layers), "mean_attention": mean,
                     "sem": sem, "k": k, "n_sequences": int(tokens.shape[0])})
    record = provenance(model, tokens, analysis="previous_token_attention", k=k, batch_size=batch_size,
                        queries="every q >= d, BOS keys included", precision=precision)
    n_seq = by_layer.shape[0]
    per = pd.DataFrame({"sequence": np.repeat(np.arange(n_seq), n_layers), "layer": np.tile(np.arange(n_layers), n_seq),
                        "mean_attention": by_layer.double().reshape(-1).numpy()})
    return {"attention": with_provenance(pd.DataFrame(rows), record),
            "per_sequence": with_provenance(per, dict(record, analysis="previous_token_attention (per sequence)"))}


def previous_token_attention_heads(
    model: Model,
    tokens: Tokens,
    k: int = 5,
    batch_size: int = 8,
    progress: bool = True,
    precision: str = "fp32",
) -> pd.DataFrame:
    """Per head, the mean attention weight on the previous ``k`` tokens (as :func:`previous_token_attention`,
    same arguments).

    Returns:
        One row per (layer, head): ``layer``, ``head``, ``relative_depth``, ``mean_attention``,
        ``sem`` (over sequences), ``k``, ``n_sequences``. The mean over a layer's heads is that
        layer's :func:`previous_token_attention`.

    Example:
        >>> import torch
        >>> df = previous_token_attention_heads(_tiny_model(), torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(0)), k=2, progress=False)
        >>> df[["layer", "head"]].values.tolist()
        [[0, 0], [0, 1], [1, 0], [1, 1]]
    """
    per_seq = _previous_token_per_sequence(model, tokens, k, batch_size, progress, precision)
    n_layers = model.cfg.n_layers
    rows = []
    for layer in range(n_layers):
        for head in range(model.cfg.n_heads):
            mean, sem = mean_and_sem(per_seq[:, layer, head].unsqueeze(1))
            rows.append({"layer": layer, "head": head, "relative_depth": relative_depth(layer, n_layers),
                         "mean_attention": mean, "sem": sem, "k": k, "n_sequences": int(tokens.shape[0])})
    record = provenance(model, tokens, analysis="previous_token_attention_heads", k=k, batch_size=batch_size,
                        queries="every q >= d, BOS keys included", precision=precision)
    return with_provenance(pd.DataFrame(rows), record)


# --------------------------------------------------------------------------------------------
# subjoiner heads

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class SubjoinerResult:
    """Subjoiner-head scores and the mean attention patterns behind them.

    Attributes:
        heads: one row per head, ranked by ``difference`` (descending): ``rank``, ``layer``,
            ``head``, ``relative_depth``, ``score`` (mean attention from the word's last piece to
            its earlier pieces), ``score_sem``, ``control_score`` (the same key offsets in control
            prompts), ``control_sem``, ``difference``, ``z`` (difference over its standard
            error), ``first_piece_score`` and ``control_first_score`` (attention to the first
            piece alone, and to the same offset in controls); provenance in ``attrs``.
        patterns: ``[layer, head, query, key]`` mean attention among the last ``window`` positions
            of the multi-piece prompts (the final word's pieces are the last ``n_pieces``).
        control_patterns: the same over the control prompts.
        prompts: the multi-piece prompts used (text, without BOS).
        control_prompts: the control prompts used.
        n_pieces: tokens in each multi-piece final word.
    """

    heads: pd.DataFrame
    patterns: Float[Tensor, "layer head query key"]
    control_patterns: Float[Tensor, "layer head query key"]
    prompts: list[str] = field(repr=False)
    control_prompts: list[str] = field(repr=False)
    n_pieces: int = 4

    def top(self, n: int = 3) -> pd.DataFrame:
        """The ``n`` best-scoring heads."""
        return self.heads.head(n)


def _candidate_prompts(
    tokenizer: Any, texts: Sequence[str], n_context_words: int, n_pieces: int
) -> tuple[list[list[str]], list[tuple[int, int]], list[tuple[int, int]]]:
    """Split the texts into words; return them with the (document, word index) of every final
    word that splits into ``n_pieces`` tokens, and of every one-token final word.
    """
    docs = [_WORD.findall(text) for text in texts]
    where: dict[str, list[tuple[int, int]]] = {}
    for d, words in enumerate(docs):
        for i in range(n_context_words, len(words)):
            w = words[i]
            if w.isascii() and w.isalpha() and w.islower():
                where.setdefault(w, []).append((d, i))
    if not where:
        return docs, [], []
    vocab = sorted(where)
    encoded = tokenizer([" " + w for w in vocab], add_special_tokens=False)["input_ids"]
    multi: list[tuple[int, int]] = []
    single: list[tuple[int, int]] = []
    for w, ids in zip(vocab, encoded):
        if len(ids) == n_pieces:
            multi.extend(where[w])
        elif len(ids) == 1:
            single.extend(where[w])
    return docs, sorted(multi), sorted(single)


def _encode_prompts(
    tokenizer: Any,
    docs: list[list[str]],
    places: Sequence[tuple[int, int]],
    n_context_words: int,
    n_pieces: int,
    bos: int,
    limit: int,
    rng: random.Random,
) -> tuple[list[list[int]], list[str]]:
    """Tokenize a random selection of prompts (``n_context_words`` words, then the final word);
    keep those whose final word's tokens are exactly the tokens of ``" " + word`` at the end
    (no merge across the space), each text once.
    """
    order = list(range(len(places)))
    rng.shuffle(order)
    out: list[list[int]] = []
    texts: list[str] = []
    seen: set[str] = set()
    for j in order:
        d, i = places[j]
        word = docs[d][i]
        text = " ".join(docs[d][i - n_context_words : i + 1])
        if text in seen:
            continue
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        word_ids = list(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        if len(word_ids) != n_pieces or ids[-n_pieces:] != word_ids:
            continue
        seen.add(text)
        out.append([bos, *ids])
        texts.append(text)
        if len(out) >= limit:
            break
    return out, texts


def _attention_stats(
    model: Model, prompts: list[list[int]], n_pieces: int, window: int, batch_size: int, progress: bool, desc: str,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-prompt scores ``[prompt, layer, head]`` (attention from the last token to the
    ``n_pieces - 1`` before it, and to the first of them) and the mean ``[layer, head, window, window]``
    pattern among the last ``window`` positions. Prompts are right-padded within a batch: with
    causal attention, padding after a prompt's end changes nothing at its positions.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    scores = torch.zeros(len(prompts), n_layers, n_heads, dtype=torch.float64)
    first = torch.zeros_like(scores)
    patterns = torch.zeros(n_layers, n_heads, window, window, dtype=torch.float64)
    state: dict[str, Any] = {}

    def reduce(layer: int, pattern: Tensor) -> None:
        start, lengths = state["start"], state["lengths"]
        for i, length in enumerate(lengths):
            block = pattern[i, :, length - window : length, length - window : length].float().cpu().double()
            patterns[layer] += block
            last = block[:, -1]  # [head, key]: the final token's attention over the window
            scores[start + i, layer] = last[:, window - n_pieces : window - 1].sum(-1)
            first[start + i, layer] = last[:, window - n_pieces]

    collector = AttentionReadout(reduce)
    device = model.cfg.device
    for start in _progress(range(0, len(prompts), batch_size), progress, desc=desc):
        group = prompts[start : start + batch_size]
        lengths = [len(p) for p in group]
        longest = max(lengths)
        batch = torch.tensor([p + [p[-1]] * (longest - len(p)) for p in group], dtype=torch.long, device=device)
        state.update(start=start, lengths=lengths)
        collect(model, batch, [collector], batch_size=len(group), progress=False, precision=precision)
    return scores, first, patterns / max(len(prompts), 1)


def subjoiner_heads(
    model: Model,
    texts: str | Sequence[str],
    n_pieces: int = 4,
    n_context_words: int = 16,
    min_prompts: int = 16,
    max_prompts: int = 128,
    window: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    precision: str = "fp32",
) -> SubjoinerResult:
    """Find heads that glue the pieces of a multi-token word ("subjoiner" heads).

    Prompts are built from any text with the model's own tokenizer, as the authors did: the
    ``n_context_words`` whitespace-separated words before a final word that is lowercase,
    alphabetic (ASCII) and splits into exactly ``n_pieces`` tokens (``" " + word``, checked to be
    the prompt's last tokens), against control prompts whose final word is a single token. BOS
    first (the library's BOS policy). Each head is scored by the attention from the prompt's last
    token to the ``n_pieces - 1`` positions before it, which are the word's earlier pieces in the
    multi-piece prompts and ordinary context in the controls; a subjoiner head scores high on the
    first and not on the second (a plain previous-token head scores on both). Heads are ranked by
    the difference.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` with a tokenizer.
        texts: a document or a list of documents (e.g. ``stages_of_inference.data.corpus_texts()``).
        n_pieces: tokens in the final word (the authors: 4), at least 2.
        n_context_words: words before the final word (the authors: 16).
        min_prompts: fewest prompts of each kind; fewer raise a ``ValueError``.
        max_prompts: most prompts of each kind, drawn at random (``seed``) from all candidates.
        window: positions at the end of each prompt kept in the mean patterns (default
            ``n_pieces + 4``, or the shortest prompt's length if that is shorter).
        seed: seeds the choice of prompts.
        batch_size: prompts per forward pass.
        progress: show progress bars.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the dtype of the model's products and
            attention (:mod:`stages_of_inference.precision`); the patterns are read in fp32.

    Returns:
        A :class:`SubjoinerResult`: the ranked head table and the mean attention patterns.

    Raises:
        ValueError: if the model has no tokenizer, the settings are out of range, or the text
            yields fewer than ``min_prompts`` prompts of either kind.

    Example:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> vocab = {w: i for i, w in enumerate(["<s>", "Ġ", "a", "b", "z", "y", "Ġa", "Ġb", "Ġz"])}
        >>> bpe = Tokenizer(models.BPE(vocab, [("Ġ", "a"), ("Ġ", "b"), ("Ġ", "z")], unk_token="<s>"))
        >>> bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        >>> m = _tiny_model(); m.tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>")
        >>> r = subjoiner_heads(m, "a b zyy b a zyy a a zyy b b zyy a b a", n_pieces=3, n_context_words=2, min_prompts=2, progress=False)
        >>> r.prompts[0].split()[-1], len(r.heads), list(r.heads.columns[:4])
        ('zyy', 4, ['rank', 'layer', 'head', 'relative_depth'])
    """
    model = check_model(model)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("subjoiner_heads builds prompts with the model's tokenizer, but this model has none")
    if isinstance(texts, str):
        texts = [texts]
    if n_pieces < 2:
        raise ValueError(f"n_pieces must be at least 2 (a word split into several tokens), got {n_pieces}")
    if n_context_words < 1:
        raise ValueError(f"n_context_words must be at least 1, got {n_context_words}")
    if min_prompts < 2 or max_prompts < min_prompts:
        raise ValueError(f"need 2 <= min_prompts <= max_prompts, got min_prompts={min_prompts}, max_prompts={max_prompts}")
    if window is not None and window < n_pieces:
        raise ValueError(f"window ({window}) must cover the final word's {n_pieces} pieces")
    bos = bos_token_id(model)

    docs, multi, single = _candidate_prompts(tokenizer, list(texts), n_context_words, n_pieces)
    rng = random.Random(seed)
    prompts, prompt_texts = _encode_prompts(tokenizer, docs, multi, n_context_words, n_pieces, bos, max_prompts, rng)
    controls, control_texts = _encode_prompts(tokenizer, docs, single, n_context_words, 1, bos, max_prompts, rng)
    if len(prompts) < min_prompts or len(controls) < min_prompts:
        raise ValueError(
            f"the text yields {len(prompts)} prompts whose final lowercase word is exactly {n_pieces} tokens and "
            f"{len(controls)} control prompts (one-token final word), after {n_context_words} context words; "
            f"min_prompts is {min_prompts}. Give more text, or lower n_pieces, n_context_words or min_prompts"
        )
    shortest = min(len(p) for p in prompts + controls)
    window = max(n_pieces, min(n_pieces + 4, shortest)) if window is None else window
    if window > shortest:
        raise ValueError(f"window ({window}) is longer than the shortest prompt ({shortest} tokens)")
    longest = max(len(p) for p in prompts + controls)
    if longest > model.cfg.n_ctx:
        raise ValueError(f"prompts of up to {longest} tokens exceed the model's context of {model.cfg.n_ctx}")

    with torch.inference_mode():
        s, s_first, pat = _attention_stats(model, prompts, n_pieces, window, batch_size, progress, "subjoiner prompts",
                                           precision)
        c, c_first, cpat = _attention_stats(model, controls, n_pieces, window, batch_size, progress, "control prompts",
                                            precision)

    def sem(x: Tensor) -> Tensor:
        return x.std(dim=0, unbiased=True) / math.sqrt(x.shape[0])

    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    score, control = s.mean(0), c.mean(0)
    score_sem, control_sem = sem(s), sem(c)
    diff = score - control
    z = diff / torch.sqrt(score_sem**2 + control_sem**2).clamp_min(1e-12)
    layer_idx, head_idx = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    df = pd.DataFrame({
        "layer": layer_idx.ravel(),
        "head": head_idx.ravel(),
        "relative_depth": [relative_depth(int(layer), n_layers) for layer in layer_idx.ravel()],
        "score": score.flatten().numpy(),
        "score_sem": score_sem.flatten().numpy(),
        "control_score": control.flatten().numpy(),
        "control_sem": control_sem.flatten().numpy(),
        "difference": diff.flatten().numpy(),
        "z": z.flatten().numpy(),
        "first_piece_score": s_first.mean(0).flatten().numpy(),
        "control_first_score": c_first.mean(0).flatten().numpy(),
        "n_prompts": len(prompts),
        "n_controls": len(controls),
    })
    df = df.sort_values(["difference", "layer", "head"], ascending=[False, True, True], kind="mergesort")
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    df = df.reset_index(drop=True)
    record = provenance(model, None, analysis="subjoiner_heads", n_pieces=n_pieces, n_context_words=n_context_words,
                        min_prompts=min_prompts, max_prompts=max_prompts, window=window, seed=seed,
                        n_prompts=len(prompts), n_controls=len(controls), bos_token_id=bos, precision=precision)
    return SubjoinerResult(with_provenance(df, record), pat.float(), cpat.float(), prompt_texts, control_texts, n_pieces)


# --------------------------------------------------------------------------------------------
# detokenization evidence from interventions

_DAMAGE = {  # damage measure -> how it is read off a sweep summary (higher = worse)
    "kl_nats": lambda s: s["kl_nats"],
    "loss_delta": lambda s: s["loss_delta"],
    "accuracy_lost": lambda s: 1.0 - s["relative_accuracy"],
    "disagreement": lambda s: 1.0 - s["top1_agreement"],
}


def pattern_table(result: Any) -> pd.DataFrame:
    """A subjoiner result's mean attention patterns as a long table: ``layer``, ``head``,
    ``prompts`` ("subword" or "control"), ``query``, ``key``, ``attention``, ``n_pieces``.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> r = SimpleNamespace(patterns=torch.rand(1, 2, 3, 3), control_patterns=torch.rand(1, 2, 3, 3), n_pieces=3)
        >>> len(pattern_table(r)), int(pattern_table(r)["n_pieces"].iloc[0])
        (36, 3)
    """
    rows = []
    for kind, tensor in (("subword", result.patterns), ("control", result.control_patterns)):
        arr = tensor.detach().cpu().float().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
        n_layers, n_heads, n_q, n_k = arr.shape
        li, hi, qi, ki = np.meshgrid(np.arange(n_layers), np.arange(n_heads), np.arange(n_q), np.arange(n_k), indexing="ij")
        rows.append(pd.DataFrame({"layer": li.ravel(), "head": hi.ravel(), "prompts": kind, "query": qi.ravel(),
                                  "key": ki.ravel(), "attention": arr.ravel()}))
    out = pd.concat(rows, ignore_index=True)
    out["n_pieces"] = int(getattr(result, "n_pieces", 0))
    return out


def first_blocks_damage(sweep_summary: Any, fraction: float = 0.2) -> pd.DataFrame:
    """How much more the first blocks' deletion (or swap) hurts than the rest's, from a robustness sweep.

    The first blocks are those at ``relative_depth < fraction`` (``i / (n_layers - 1)``; 0.2: the
    first fifth). For each intervention kind in the sweep and each damage measure (``kl_nats``,
    ``loss_delta``, ``accuracy_lost`` = ``1 - relative_accuracy``, ``disagreement`` =
    ``1 - top1_agreement``; higher is worse), it reports the mean over the first blocks, the mean
    over the rest, their ratio, and the worst block.

    Args:
        sweep_summary: a ``robustness_sweep`` result or its ``summary`` DataFrame (columns
            ``kind``, ``layer``, ``relative_depth``, ``kl_nats``, ``loss_delta``,
            ``relative_accuracy``, ``top1_agreement``; the ``kind == "none"`` row is ignored).
        fraction: relative depth below which a block counts as one of the first, in (0, 1).

    Returns:
        One row per (kind, measure): ``kind``, ``measure``, ``first_mean``, ``rest_mean``,
        ``ratio`` (first / rest), ``worst_layer``, ``worst_value``, ``n_first``, ``n_rest``,
        ``fraction``.

    Example:
        >>> import pandas as pd
        >>> s = pd.DataFrame({"kind": ["none"] + ["drop"] * 5, "layer": [None, 0, 1, 2, 3, 4],
        ...                   "relative_depth": [None, 0, .25, .5, .75, 1], "kl_nats": [0, 8, .2, .1, .3, 2],
        ...                   "loss_delta": [0, 7, .1, .1, .2, 1], "relative_accuracy": [1, .1, .9, .95, .9, .7],
        ...                   "top1_agreement": [1, .1, .9, .9, .9, .6]})
        >>> d = first_blocks_damage(s)
        >>> d[d.measure == "kl_nats"][["first_mean", "rest_mean", "worst_layer"]].to_dict("records")
        [{'first_mean': 8.0, 'rest_mean': 0.65, 'worst_layer': 0}]
    """
    summary = getattr(sweep_summary, "summary", sweep_summary)
    if not isinstance(summary, pd.DataFrame):
        raise TypeError(f"expected a robustness-sweep summary DataFrame (or sweep result), got {type(sweep_summary).__name__}")
    needed = {"kind", "layer", "relative_depth", "kl_nats", "loss_delta", "relative_accuracy", "top1_agreement"}
    missing = sorted(needed - set(summary.columns))
    if missing:
        raise ValueError(f"the sweep summary lacks columns {missing}; expected robustness_sweep(...).summary")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
    kinds = [k for k in ("drop", "swap") if (summary["kind"] == k).any()]
    kinds += sorted(set(summary["kind"]) - {"none", "drop", "swap"})
    if not kinds:
        raise ValueError("the sweep summary has no intervention rows (kind 'drop' or 'swap')")
    rows = []
    for kind in kinds:
        part = summary[summary["kind"] == kind]
        depth = part["relative_depth"].astype(float)
        first, rest = part[depth < fraction], part[depth >= fraction]
        if first.empty or rest.empty:
            raise ValueError(
                f"fraction {fraction} leaves {len(first)} first and {len(rest)} other {kind!r} rows; "
                "both must be non-empty"
            )
        for measure, read in _DAMAGE.items():
            values = read(part).astype(float)
            f_mean, r_mean = float(read(first).astype(float).mean()), float(read(rest).astype(float).mean())
            worst = int(values.to_numpy().argmax())
            rows.append({
                "kind": kind,
                "measure": measure,
                "first_mean": f_mean,
                "rest_mean": r_mean,
                "ratio": f_mean / r_mean if r_mean != 0 else float("inf"),
                "worst_layer": int(part["layer"].iloc[worst]),
                "worst_value": float(values.iloc[worst]),
                "n_first": len(first),
                "n_rest": len(rest),
                "fraction": fraction,
            })
    df = pd.DataFrame(rows)
    df.attrs["provenance"] = dict(summary.attrs.get("provenance", {}), derived="first_blocks_damage",
                                  fraction=fraction)
    return df
