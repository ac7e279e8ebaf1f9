"""Task-level damage (beyond the paper): does a deletion or a swap that keeps token-level accuracy
also keep what the model can *do*?

Song et al. 2025 (arXiv:2510.02091) find that likelihood metrics hide damage that task and
generation metrics reveal. Two measures, for every plan of a sweep, both read off the prefix-sharing
engine (:func:`~stages_of_inference.interventions.executor.evaluate_plans`) with no generation loop
per plan:

* **Cloze** (LAMBADA-like, :func:`cloze_items`): passages whose last word is to be predicted; the
  word, which may be several tokens, is predicted greedily piece by piece and counts as right only
  if every piece is. Greedy decoding that gets every earlier piece right sees exactly the true
  earlier pieces, so an item is right exactly when the plan's top-1 equals the true token at every
  answer position of one teacher-forced forward: the engine's per-token ``correct``.
* **Generation** (:func:`generation_check`): from a set of prompts, the length of the greedy
  continuation (up to ``new_tokens`` tokens) each plan shares with the unmodified model. The
  unmodified model's greedy continuation is generated once; a plan's own greedy continuation
  equals it for as long as the plan's top-1 at each step equals the next token of it, so the shared
  length is the number of leading continuation positions where the plan is ``correct`` on the
  prompt followed by that continuation, again one teacher-forced forward per plan.

:func:`task_damage` runs both over every deletion and swap and puts the retained share beside the
token-level accuracy retained: on the same sequences, or the paper's, from a deletion sweep the
caller already has (then the engine unembeds only the answer and continuation positions:
``score_last``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from stages_of_inference._tl import HookedTransformer, Model
from stages_of_inference._utils import check_count, check_model, relative_depth
from stages_of_inference.backends import as_seam
from stages_of_inference.backends.state import exclusive
from stages_of_inference.backends.step import set_step
from stages_of_inference.interventions.executor import evaluate_plans
from stages_of_inference.interventions.plan import LayerPlan
from stages_of_inference.models import bos_token_id
from stages_of_inference.precision import autocast, check_model_precision, compute_dtype
from stages_of_inference.results import provenance, with_provenance

__all__ = ["ClozeItem", "cloze_items", "cloze_scores", "generation_check", "load_cloze_items", "task_damage",
           "with_token_level"]

ClozeItem = tuple[str, str]
"""A cloze item: ``(context, answer)``; the answer is the word that follows the context."""

_FINAL_WORD = re.compile(r"([A-Za-z][a-z]{3,})[.!?]")


def _word_model() -> HookedTransformer:  # for docstring examples: a tiny model with a word-level tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens import HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "<unk>", *"abcdefghi"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=16, d_head=4, n_heads=2,
                                                      d_vocab=len(words), act_fn="relu", seed=0))
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")
    return model


def cloze_items(texts: str | Sequence[str], n_items: int = 256, seed: int = 0, context_chars: int = 600,
                in_context: bool = True) -> list[ClozeItem]:
    """LAMBADA-like items from any text: an alphabetic word of at least 4 letters that ends a
    sentence is the answer, the ``context_chars`` characters before it (whitespace normalised,
    starting at a word) the context. With ``in_context`` only answers that also occur in their
    context (as a whole word, any case) are candidates: as in LAMBADA, where most target words occur
    in the passage, the context then bears on the answer, and an unmodified model gets enough items
    right for the share a plan retains to mean something. ``n_items`` of them, drawn at random
    (``seed``) from every candidate, in text order.

    Example:
        >>> text = "It was late and the house was dark. " * 3 + "She opened the door and saw the garden."
        >>> items = cloze_items(text, n_items=2, context_chars=40, in_context=False)
        >>> [answer for _, answer in items], items[0][0][-9:]
        (['dark', 'garden'], 'house was')
        >>> [answer for _, answer in cloze_items(text, n_items=5, context_chars=40)]  # "garden" is new to its context
        ['dark', 'dark']
    """
    docs = [texts] if isinstance(texts, str) else list(texts)
    n_items = check_count(n_items, "n_items", "a positive number of items")
    candidates: list[ClozeItem] = []
    for doc in docs:
        flat = " ".join(doc.split())
        for match in _FINAL_WORD.finditer(flat):
            start = match.start(1)
            if start < context_chars // 2 or flat[start - 1] != " ":
                continue
            context = flat[max(0, start - 1 - context_chars) : start - 1]
            context = context[context.find(" ") + 1 :] if start - 1 > context_chars else context
            word = match.group(1)
            if in_context and not re.search(rf"\b{word}\b", context, flags=re.IGNORECASE):
                continue
            candidates.append((context, word))
    if not candidates:
        raise ValueError("the text holds no sentence-final word to build cloze items from"
                         + (" that also occurs in its context" if in_context else "") + "; give more text")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(candidates)), min(n_items, len(candidates))))
    return [candidates[i] for i in chosen]


def load_cloze_items(path: str | Path) -> list[ClozeItem]:
    r"""Cloze items from a JSON-lines file: one object per line with string fields ``context`` and
    ``answer`` (LAMBADA, or ARC-style items turned into a context and its answer word).

    Example:
        >>> import json, tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "items.jsonl"
        >>> _ = p.write_text(json.dumps({"context": "The cat sat on the", "answer": "mat"}) + "\n")
        >>> load_cloze_items(p)
        [('The cat sat on the', 'mat')]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no cloze item file at {path} (a regular JSON-lines file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"the cloze file {path} is not UTF-8 text (byte {error.start} cannot be decoded); "
                         "give a UTF-8 JSON-lines file, or convert it first (e.g. iconv -f latin1 -t utf-8)") from None
    items: list[ClozeItem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not JSON ({error.msg}); each line must be "
                             '{"context": "...", "answer": "..."}') from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) and record[k].strip()
                                                   for k in ("context", "answer")):
            raise ValueError(f'{path}:{number} must be an object with non-empty string fields "context" and "answer"')
        items.append((record["context"], record["answer"]))
    if not items:
        raise ValueError(f"{path} holds no cloze items")
    return items


def _check_items(items: Iterable[Any]) -> list[ClozeItem]:
    items = list(items)
    if not items:
        raise ValueError("no cloze items: give (context, answer) pairs")
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) and s.strip() for s in item)):
            raise ValueError(f"a cloze item must be a (context, answer) pair of non-empty strings, got {item!r}")
    return [(c, a) for c, a in items]


def _encode_items(model: Model, items: list[ClozeItem], context_tokens: int) -> list[tuple[list[int], int]]:
    """Per item: ``[BOS] + the last context_tokens tokens of the context + the answer's tokens``, and
    the number of answer tokens. The answer is tokenised with a leading space, as it follows a word.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("cloze items are tokenised with the model's tokenizer, but this model has none")
    bos = bos_token_id(model)
    out = []
    for context, answer in items:
        ctx = tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"][-context_tokens:]
        ans = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
        if not ctx or not ans:
            raise ValueError(f"the item {(context[-40:], answer)!r} tokenises to an empty context or answer")
        out.append(([bos, *ctx, *ans], len(ans)))
    return out


def _by_length(sequences: list[list[int]]) -> dict[int, list[int]]:
    """Indexes of the sequences of each length (the engine runs equal-length batches, no padding)."""
    groups: dict[int, list[int]] = {}
    for i, seq in enumerate(sequences):
        groups.setdefault(len(seq), []).append(i)
    return groups


def _plan_correct(model: Model, tokens: Tensor, plans: Sequence[LayerPlan], batch_size: int,
                  progress: bool, precision: str, score_last: int | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """``correct[plan, sequence, position]`` over the scored positions (``1 .. T-2``, or the last
    ``score_last`` of them) and the summary of one engine sweep.
    """
    summary, per_token = evaluate_plans(model, tokens, plans, batch_size=batch_size, per_token=True, progress=progress,
                                        precision=precision, score_last=score_last)
    n_seq, n_pos = tokens.shape[0], score_last or tokens.shape[1] - 2
    first = tokens.shape[1] - 1 - n_pos
    distinct = {p: k for k, p in enumerate(dict.fromkeys(summary["plan"]))}  # the per-token table has each order once
    correct = np.zeros((len(distinct), n_seq, n_pos), dtype=bool)
    rows = per_token["plan"].map(distinct).to_numpy()
    correct[rows, per_token["sequence"].to_numpy(), per_token["position"].to_numpy() - first] = per_token["correct"]
    return correct[[distinct[p] for p in summary["plan"]]], summary


def cloze_scores(
    model: Model,
    items: Sequence[ClozeItem],
    plans: Sequence[LayerPlan],
    *,
    context_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
    precision: str = "fp32",
    token_accuracy: bool = True,
) -> pd.DataFrame:
    """Cloze accuracy of each plan: an item is right when the plan's top-1 is the true token at
    every piece of the answer (module docstring: what greedy decoding would give).

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` with a tokenizer.
        items: ``(context, answer)`` pairs (:func:`cloze_items`, :func:`load_cloze_items`).
        plans: the plans to score (the same plan twice is scored once).
        context_tokens: at most this many tokens of each context, its end.
        batch_size: sequences per sweep pass.
        progress: show a progress bar.
        precision: the dtype of the model's products (:mod:`stages_of_inference.precision`).
        token_accuracy: also score every other position of the items, for ``token_accuracy``;
            ``False`` unembeds only the answer positions (``score_last`` of the engine: about a
            third less work for items of 25 tokens), and ``token_accuracy`` is NaN.

    Returns:
        One row per plan: ``plan`` (JSON), ``label``, ``cloze_accuracy``, ``token_accuracy`` (the
        top-1 accuracy over every scored position of the same sequences), ``n_items``,
        ``n_tokens`` (the positions ``token_accuracy`` pools); the unmodified model need not be
        among the plans.

    Example:
        >>> m = _word_model()
        >>> df = cloze_scores(m, [("a b c d", "e"), ("b c d e", "f")], [LayerPlan.identity(2), LayerPlan.drop(2, 0)], progress=False)
        >>> df["label"].tolist(), int(df["n_items"].iloc[0])
        (['identity', 'drop 0'], 2)
    """
    model = check_model(model)
    items = _check_items(items)
    context_tokens = check_count(context_tokens, "context_tokens", "a positive number of tokens")
    check_model_precision(model.W_U.dtype, precision, model.cfg.device)
    encoded = _encode_items(model, items, context_tokens)
    right = np.zeros((len(plans), len(items)), dtype=bool)
    token_hits, token_count = np.zeros(len(plans)), 0
    labels: list[str] = []
    for length, members in sorted(_by_length([seq for seq, _ in encoded]).items()):
        tokens = torch.tensor([encoded[i][0] for i in members], device=model.cfg.device)
        if length < 3:
            raise ValueError("a cloze sequence needs at least BOS, one context token and the answer")
        last = None if token_accuracy else max(encoded[i][1] for i in members)  # the longest answer's pieces
        correct, summary = _plan_correct(model, tokens, plans, batch_size, progress, precision, last)
        labels = summary["label"].tolist()
        for row, i in enumerate(members):
            pieces = encoded[i][1]
            right[:, i] = correct[:, row, -pieces:].all(axis=1)
        token_hits += correct.sum(axis=(1, 2))
        token_count += correct.shape[1] * correct.shape[2]
    return pd.DataFrame({
        "plan": [p.to_json() for p in plans], "label": labels,
        "cloze_accuracy": right.mean(axis=1),
        "token_accuracy": token_hits / token_count if token_accuracy else np.full(len(plans), np.nan),
        "n_items": len(items), "n_tokens": token_count if token_accuracy else 0,
    })


def _greedy_continuation(model: Model, prompts: Tensor, new_tokens: int, precision: str) -> Tensor:
    """The prompts followed by the unmodified model's greedy continuation of ``new_tokens`` tokens.

    Every step runs the whole ``prompt + new_tokens`` window, the positions not generated yet
    holding a placeholder: attention is causal, so the logits at the last generated position never
    see them, and one window length lets the fast path (:mod:`~stages_of_inference.interventions.fastpath`)
    keep its prepared weights for every step. Only that position is normed and unembedded.
    """
    seam = as_seam(model)
    n_prompt = prompts.shape[1]
    window = torch.cat([prompts, prompts[:, -1:].expand(-1, new_tokens)], dim=1).clone()
    fast = None
    with exclusive(seam.model), torch.inference_mode(), autocast(precision, seam.device):
        try:
            for step in range(new_tokens):
                emb = seam.embed(window)
                if step == 0:
                    fast = seam.fast_blocks(emb, True, None if precision == "fp32" else compute_dtype(precision))
                residual = emb.residual
                for layer in range(seam.n_layers):
                    if fast is not None and fast.allowed[layer]:
                        residual = fast(layer, residual)
                    else:
                        residual = seam.run_block(layer, residual, emb, layer)
                at = n_prompt - 1 + step
                last = seam.final_norm(residual[:, at : at + 1])
                window[:, at + 1] = seam.unembed_module(last)[:, -1].float().argmax(-1)
        finally:
            set_step(seam.model, None)
    return window


def generation_check(
    model: Model,
    prompts: Tensor,
    plans: Sequence[LayerPlan],
    *,
    new_tokens: int = 16,
    batch_size: int = 8,
    progress: bool = True,
    precision: str = "fp32",
) -> pd.DataFrame:
    """How long each plan's greedy continuation of each prompt stays the unmodified model's.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        prompts: ``[n, pos]`` token ids, BOS first, all of one length.
        plans: the plans to score.
        new_tokens: the length of the unmodified model's greedy continuation (the most a plan can share).
        batch_size: sequences per forward and per sweep pass.
        progress: show a progress bar.
        precision: the dtype of the model's products (:mod:`stages_of_inference.precision`), the
            reference continuation's included.

    Returns:
        One row per plan: ``plan``, ``label``, ``shared_tokens`` (the mean over prompts of the
        shared greedy length), ``shared_share`` (over ``new_tokens``), ``all_shared`` (the share of
        prompts continued identically to the end), ``n_prompts``, ``new_tokens``.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=16, d_head=4, d_vocab=5, act_fn="relu"))
        >>> df = generation_check(m, torch.tensor([[0, 1, 2], [0, 3, 4]]), [LayerPlan.identity(2), LayerPlan.drop(2, 1)],
        ...                       new_tokens=4, progress=False)
        >>> float(df["shared_tokens"].iloc[0]), int(df["n_prompts"].iloc[0])
        (4.0, 2)
    """
    model = check_model(model)
    new_tokens = check_count(new_tokens, "new_tokens", "a positive number of tokens")
    precision = check_model_precision(model.W_U.dtype, precision, model.cfg.device)
    if prompts.ndim != 2 or prompts.shape[1] < 2:
        raise ValueError(f"prompts must be [n, pos] token ids with pos >= 2 (BOS and at least one token), "
                         f"got shape {tuple(prompts.shape)}")
    if prompts.shape[1] + new_tokens > model.cfg.n_ctx:
        raise ValueError(f"prompts of {prompts.shape[1]} tokens plus {new_tokens} new ones exceed the context of "
                         f"{model.cfg.n_ctx}")
    prompts = prompts.to(model.cfg.device)  # the unmodified model's greedy continuation, once for every plan
    sequences = torch.cat([_greedy_continuation(model, prompts[i : i + batch_size], new_tokens, precision)
                           for i in range(0, len(prompts), batch_size)])
    # the last new_tokens scored positions predict the continuation, the first from the prompt's last token
    agree, summary = _plan_correct(model, sequences, plans, batch_size, progress, precision, new_tokens)
    shared = np.where(agree.all(axis=2), new_tokens, (~agree).argmax(axis=2))  # leading agreements
    return pd.DataFrame({
        "plan": [p.to_json() for p in plans], "label": summary["label"].tolist(),
        "shared_tokens": shared.mean(axis=1), "shared_share": shared.mean(axis=1) / new_tokens,
        "all_shared": (shared == new_tokens).mean(axis=1), "n_prompts": len(prompts), "new_tokens": new_tokens,
    })


def _accuracy_of(summary: pd.DataFrame, meta: Sequence[tuple[str, int | None]]) -> pd.Series:
    """The ``accuracy`` of each ``(kind, layer)`` plan in a sweep summary."""
    if not {"kind", "layer", "accuracy"} <= set(summary.columns):
        raise ValueError("token_level must be a sweep summary with 'kind', 'layer' and 'accuracy' columns "
                         f"(robustness_sweep(...).summary), got columns {list(summary.columns)}")
    by_plan = {(kind, None if pd.isna(layer) else int(layer)): float(acc)
               for kind, layer, acc in zip(summary["kind"], summary["layer"], summary["accuracy"])}
    missing = [f"{kind} {layer}" if layer is not None else kind for kind, layer in meta if (kind, layer) not in by_plan]
    if missing:
        raise ValueError(f"token_level lacks {len(missing)} of the plans scored here (e.g. {missing[0]!r}); "
                         "give a sweep of every deletion and swap (robustness_sweep's default kinds)")
    return pd.Series([by_plan[key] for key in meta])


def _token_level_note(token_level: pd.DataFrame | None | bool) -> str:
    """What the token-level columns hold, for the provenance."""
    if token_level is None:
        return "every position of the cloze sequences"
    if token_level is False:
        return "not measured here (with_token_level fills it from a sweep)"
    count = f" ({int(token_level['n_tokens'].iloc[0])} tokens per plan)" if "n_tokens" in token_level else ""
    return "the accuracy of the given sweep" + count


def with_token_level(table: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """A :func:`task_damage` table with its token-level columns (``token_accuracy``,
    ``token_retained``) taken from a sweep's summary, as ``task_damage(..., token_level=summary)``
    would give them.

    Example:
        >>> t = pd.DataFrame({"kind": ["none", "drop"], "layer": pd.array([None, 0], dtype="Int64"),
        ...                   "token_accuracy": [np.nan, np.nan], "token_retained": [np.nan, np.nan]})
        >>> s = pd.DataFrame({"kind": ["none", "drop"], "layer": pd.array([None, 0], dtype="Int64"), "accuracy": [.5, .25]})
        >>> with_token_level(t, s)["token_retained"].tolist()
        [1.0, 0.5]
    """
    meta = [(kind, None if pd.isna(layer) else int(layer)) for kind, layer in zip(table["kind"], table["layer"])]
    tokens = _accuracy_of(summary, meta).to_numpy()
    out = table.copy()
    out["token_accuracy"] = tokens
    out["token_retained"] = tokens / tokens[0] if tokens[0] > 0 else np.full(len(tokens), np.nan)
    record = dict(table.attrs.get("provenance", {}))
    if record:
        settings = dict(record.get("settings", {}))
        settings["token_level"] = _token_level_note(summary)
        record["settings"] = settings
    out.attrs["provenance"] = record
    return out


def task_damage(
    model: Model,
    items: Sequence[ClozeItem],
    prompts: Tensor,
    *,
    context_tokens: int = 64,
    new_tokens: int = 16,
    batch_size: int = 8,
    progress: bool = True,
    precision: str = "fp32",
    token_level: pd.DataFrame | None | bool = None,
) -> pd.DataFrame:
    """Every single-block deletion and adjacent swap, scored at the task level (cloze accuracy,
    shared greedy continuation) beside token-level accuracy, each also as the share of the
    unmodified model's.

    Token-level accuracy is the top-1 accuracy over every position of the cloze sequences, or,
    given ``token_level``, the paper's own: a deletion sweep's ``accuracy`` on other text (the
    study passes its robustness sweep, so only the answer positions of the cloze items are
    unembedded here).

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` with a tokenizer.
        items: cloze items (:func:`cloze_items`, :func:`load_cloze_items`, or your own pairs).
        prompts: ``[n, pos]`` prompts of one length, BOS first, for the generation check.
        context_tokens: at most this many tokens of each cloze context.
        new_tokens: length of the greedy continuations compared.
        batch_size: sequences per sweep pass.
        progress: show progress bars.
        precision: the dtype of the model's products (:mod:`stages_of_inference.precision`).
        token_level: a summary of :func:`~stages_of_inference.robustness.robustness_sweep` (its
            ``kind``, ``layer`` and ``accuracy`` columns) holding every plan scored here, ``None``
            (measured on the cloze sequences), or ``False``: not measured, the token columns are
            left empty for :func:`with_token_level` to fill from a sweep finished later (what a
            distributed study does).

    Returns:
        One row per plan (``kind`` "none", "drop", "swap"; ``layer``; ``relative_depth``):
        ``cloze_accuracy``, ``cloze_retained``, ``token_accuracy``, ``token_retained``,
        ``shared_tokens``, ``generation_retained``, ``all_shared``, ``n_items``, ``n_prompts``,
        ``new_tokens``; provenance in ``attrs``.

    Example:
        >>> import torch
        >>> m = _word_model()
        >>> df = task_damage(m, [("a b c d", "e")], torch.tensor([[0, 1, 2]]), new_tokens=3, progress=False)
        >>> df["kind"].tolist(), float(df["generation_retained"].iloc[0])
        (['none', 'drop', 'drop', 'swap'], 1.0)
    """
    model = check_model(model)
    n = model.cfg.n_layers
    meta = [("none", None)] + [("drop", i) for i in range(n)] + [("swap", i) for i in range(n - 1)]
    plans = [LayerPlan.identity(n)] + [LayerPlan.drop(n, i) for i in range(n)] + [LayerPlan.swap(n, i) for i in range(n - 1)]
    if token_level is True or not (token_level is None or token_level is False or isinstance(token_level, pd.DataFrame)):
        raise ValueError("token_level must be a sweep summary (robustness_sweep(...).summary), None (measured on the "
                         f"cloze sequences) or False (left for with_token_level), got {type(token_level).__name__}")
    cloze = cloze_scores(model, items, plans, context_tokens=context_tokens, batch_size=batch_size, progress=progress,
                         precision=precision, token_accuracy=token_level is None)
    if token_level is None:
        tokens = cloze["token_accuracy"]
    elif token_level is False:
        tokens = pd.Series(np.full(len(meta), np.nan))
    else:
        tokens = _accuracy_of(token_level, meta)
    gen = generation_check(model, prompts, plans, new_tokens=new_tokens, batch_size=batch_size, progress=progress,
                           precision=precision)

    def retained(column: pd.Series) -> np.ndarray:
        base = float(column.iloc[0])
        return column.to_numpy() / base if base > 0 else np.full(len(column), np.nan)

    df = pd.DataFrame({
        "kind": [k for k, _ in meta],
        "layer": pd.array([layer for _, layer in meta], dtype="Int64"),
        "relative_depth": [np.nan if layer is None else relative_depth(layer, n) for _, layer in meta],
        "cloze_accuracy": cloze["cloze_accuracy"], "cloze_retained": retained(cloze["cloze_accuracy"]),
        "token_accuracy": tokens, "token_retained": retained(tokens),
        "shared_tokens": gen["shared_tokens"], "generation_retained": gen["shared_share"] / gen["shared_share"].iloc[0]
        if gen["shared_share"].iloc[0] > 0 else np.nan,
        "all_shared": gen["all_shared"], "n_items": cloze["n_items"], "n_prompts": gen["n_prompts"],
        "new_tokens": new_tokens,
    })
    record = provenance(model, None, analysis="task_damage", n_items=len(items), context_tokens=context_tokens,
                        n_prompts=int(prompts.shape[0]), prompt_tokens=int(prompts.shape[1]), new_tokens=new_tokens,
                        precision=precision, cloze="right when the top-1 is the true token at every answer piece",
                        token_level=_token_level_note(token_level),
                        generation="leading continuation tokens where the plan's top-1 is the unmodified model's greedy token")
    return with_provenance(df, record)
