"""Guess then refine: what the logit lens predicts early, by how frequent the token is and whether
it is a function word (after Gupta et al., arXiv:2510.18871).

Gupta et al. read the lens's early top-1 predictions as statistical guesses: frequent tokens
first, refined into the right token later; and function words settle earlier than content words.
:func:`guess_then_refine` measures both on any model and text, from one streamed lens pass:

* frequency buckets: every token id gets the rank of its count in ``frequencies`` (by default the
  counts over the token batch itself; pass counts over a larger corpus sample for a steadier
  ranking), and falls in one of :data:`BUCKETS`: ranks 1-10, 11-100, 101-1,000, rarer, or never
  seen (count 0). Per readout: the share of the lens's top-1 guesses in each bucket, and the lens's
  top-1 accuracy on the positions whose true next token is in each bucket;
* word classes: the final readout's top-1 token (the model's own prediction) is a *function* word
  when its text, stripped of spaces and lower-cased, is in :data:`FUNCTION_WORDS` (articles,
  pronouns, prepositions, conjunctions, auxiliary and modal verbs, a few particles: 131 English
  words), *content* when it is another word of letters, *other* otherwise (punctuation, digits,
  pieces of words without letters). Per class, and per frequency bucket of the final top-1: the
  prediction depth of its tokens (the first readout from which the lens's top-1 stays the final
  one, as :func:`~stages_of_inference.stages.feature_engineering.prediction_depth`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from stages_of_inference._tl import Model
from stages_of_inference._utils import check_count, check_model, check_tokens, relative_depth
from stages_of_inference.batch import Tokens
from stages_of_inference.lens import Convention, convention_name, convention_record, iter_lens
from stages_of_inference.metrics import DEFAULT_CHUNK_TOKENS
from stages_of_inference.precision import check_precision
from stages_of_inference.results import provenance, with_provenance

__all__ = ["BUCKETS", "FUNCTION_WORDS", "WORD_CLASSES", "frequency_buckets", "guess_then_refine", "word_classes"]

BUCKETS = ("top 10", "11-100", "101-1000", "rarer", "unseen")
"""The frequency buckets, by the rank of a token's count (1 = the most frequent)."""

WORD_CLASSES = ("function", "content", "other")
"""The word classes of :func:`word_classes`, by index."""

FUNCTION_WORDS = frozenset("""
a an the this that these those my your his her its our their some any no every each either neither
i me you he him she it we us they them myself yourself himself herself itself ourselves themselves
who whom whose which what one
of in on at by for with about against between into through during before after above below to from
up down out off over under again upon within without along among around across behind beyond than
and but or nor so yet if because although though while whereas unless until as whether
be am is are was were been being have has had having do does did doing
will would shall should can could may might must
not there here then too very just also only
""".split())
"""The function words (131): a token whose stripped, lower-cased text is one of them is a
function word."""


def frequency_buckets(counts: np.ndarray) -> np.ndarray:
    """The bucket (an index into :data:`BUCKETS`) of every token id, from its count: ranks by count,
    most frequent first (ties by token id), ranks 1-10, 11-100, 101-1,000, rarer; count 0 unseen.

    Example:
        >>> frequency_buckets(np.array([5, 0, 9] + [1] * 20)).tolist()[:4]
        [0, 4, 0, 0]
    """
    counts = np.asarray(counts)
    order = np.lexsort((np.arange(len(counts)), -counts))  # by count, descending; then by id
    rank = np.empty(len(counts), dtype=np.int64)
    rank[order] = np.arange(1, len(counts) + 1)
    bucket = np.digitize(rank, [11, 101, 1001])
    return np.where(counts > 0, bucket, len(BUCKETS) - 1)


def word_classes(pieces: Sequence[str | None]) -> np.ndarray:
    """The class of every token piece (a tokenizer's ``convert_ids_to_tokens``): 0 function word,
    1 content word, 2 other (module docstring). The byte-level and SentencePiece space marks
    (``Ġ``, ``▁``) are stripped first.

    Example:
        >>> word_classes(["Ġthe", "ĠCat", ",", "ing", "▁Would"]).tolist()
        [0, 1, 2, 1, 0]
    """
    out = np.full(len(pieces), 2, dtype=np.int64)
    for i, piece in enumerate(pieces):
        word = str(piece or "").replace("Ġ", "").replace("▁", "").strip().lower()
        if word in FUNCTION_WORDS:
            out[i] = 0
        elif word.isalpha():
            out[i] = 1
    return out


def guess_then_refine(
    model: Model,
    tokens: Tokens,
    convention: Convention = "paper",
    *,
    frequencies: np.ndarray | None = None,
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    precision: str = "fp32",
) -> dict[str, pd.DataFrame]:
    """Guess-then-refine readings of the logit lens (module docstring), from one streamed pass.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``, with its tokenizer.
        tokens: ``[batch, pos]`` token ids, BOS first, at least 3 positions.
        convention: the lens convention, ``"paper"``, ``"per_layer_norm"`` or a
            :class:`~stages_of_inference.tuned_lens.TunedLens`.
        frequencies: a count per token id (``d_vocab`` numbers) ranking the tokens; default: the
            counts over ``tokens``.
        batch_size: sequences per forward pass.
        chunk_tokens: token positions unembedded at once.
        progress: show a progress bar.
        precision: the dtype of the model's products and the lens unembedding.

    Returns:
        ``{"buckets": ..., "words": ..., "depth_by_bucket": ...}``. ``buckets``: one row per readout ``layer`` and
        ``bucket`` with ``relative_depth``, ``guess_share`` (of all scored positions, the share
        whose lens top-1 is in the bucket), ``accuracy`` (the lens top-1 accuracy on positions whose
        true next token is in the bucket; NaN where none is), ``n_targets``. ``words``: one row per
        word ``word_class`` (of the final top-1) with ``n_tokens``, ``mean_depth``,
        ``median_depth`` (readouts), ``mean_relative_depth``. ``depth_by_bucket``: the same per
        frequency ``bucket`` of the final top-1. All carry ``convention`` and provenance.

    Example:
        >>> from stages_of_inference.stages.feature_engineering import _tiny_model
        >>> m = _tiny_model()
        >>> m.tokenizer = None
        >>> guess_then_refine(m, torch.zeros(2, 6, dtype=torch.long), progress=False)
        Traceback (most recent call last):
        ...
        ValueError: guess_then_refine needs the model's tokenizer to tell function words from content words
    """
    model = check_model(model)
    source, tokens = tokens, check_tokens(model, tokens, min_len=3)
    name = convention_name(convention)
    check_count(batch_size, "batch_size", "a positive number of sequences")
    precision = check_precision(precision)
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("guess_then_refine needs the model's tokenizer to tell function words from content words")
    classes = word_classes(model.tokenizer.convert_ids_to_tokens(list(range(model.cfg.d_vocab))))
    d_vocab = model.cfg.d_vocab
    counted_here = frequencies is None
    if counted_here:
        frequencies = np.bincount(tokens.reshape(-1).cpu().numpy(), minlength=d_vocab)
    frequencies = np.asarray(frequencies)
    if frequencies.shape != (d_vocab,) or not np.isfinite(frequencies).all() or (frequencies < 0).any():
        raise ValueError(f"frequencies must be {d_vocab} non-negative counts, one per token id, got shape "
                         f"{frequencies.shape}")
    bucket = torch.as_tensor(frequency_buckets(frequencies))
    n_points, n_buckets = model.cfg.n_layers + 1, len(BUCKETS)
    guesses = torch.zeros(n_points, n_buckets, dtype=torch.float64)
    hits = torch.zeros(n_points, n_buckets, dtype=torch.float64)
    targets_in = torch.zeros(n_buckets, dtype=torch.float64)
    depths, finals = [], []
    for chunk in iter_lens(model, tokens, convention, batch_size=batch_size, chunk_tokens=chunk_tokens,
                           progress=progress, precision=precision):
        with torch.inference_mode():
            top1 = torch.stack([chunk.logits(k).argmax(dim=-1) for k in range(n_points)]).cpu()  # [point, n]
        target_bucket = bucket[chunk.targets.cpu()]
        targets_in += torch.bincount(target_bucket, minlength=n_buckets).double()
        for k in range(n_points):
            guesses[k] += torch.bincount(bucket[top1[k]], minlength=n_buckets).double()
            right = top1[k] == chunk.targets.cpu()
            hits[k] += torch.bincount(target_bucket[right], minlength=n_buckets).double()
        differs = top1 != top1[-1]  # the readouts whose top-1 is not the final one
        last_differs = torch.where(differs.any(0), n_points - 1 - differs.flip(0).int().argmax(0), -1)
        depths.append(last_differs + 1)
        finals.append(top1[-1])
    n_scored = float(targets_in.sum())
    rows = []
    for k in range(n_points):
        for b, name in enumerate(BUCKETS):
            rows.append({"layer": k, "relative_depth": relative_depth(k, n_points), "bucket": name,
                         "guess_share": float(guesses[k, b]) / n_scored,
                         "accuracy": float(hits[k, b] / targets_in[b]) if targets_in[b] > 0 else float("nan"),
                         "n_targets": int(targets_in[b]), "convention": name})
    depth = torch.cat(depths).numpy()
    final = torch.cat(finals).numpy()
    words = _depth_rows("word_class", WORD_CLASSES, classes[final], depth, n_points - 1, name)
    by_bucket = _depth_rows("bucket", BUCKETS, bucket.numpy()[final], depth, n_points - 1, name)
    record = provenance(model, source, analysis="guess_then_refine", convention=convention_record(convention), precision=precision,
                        batch_size=batch_size, frequencies="the token batch" if counted_here else "given",
                        function_words=len(FUNCTION_WORDS))
    return {"buckets": with_provenance(pd.DataFrame(rows), record), "words": with_provenance(words, record),
            "depth_by_bucket": with_provenance(by_bucket, record)}


def _depth_rows(column: str, names: tuple[str, ...], group: np.ndarray, depth: np.ndarray, n_layers: int,
                convention: str) -> pd.DataFrame:
    """Prediction depth per group (``group`` indexes ``names``): count, mean, median, relative mean."""
    rows = []
    for g, name in enumerate(names):
        d = depth[group == g]
        rows.append({column: name, "n_tokens": int(len(d)), "mean_depth": float(d.mean()) if len(d) else float("nan"),
                     "median_depth": float(np.median(d)) if len(d) else float("nan"),
                     "mean_relative_depth": float(d.mean()) / n_layers if len(d) else float("nan"),
                     "convention": convention})
    return pd.DataFrame(rows)
