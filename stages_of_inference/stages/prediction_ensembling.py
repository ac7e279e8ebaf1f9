"""Stage 3, prediction ensembling: prediction and suppression neurons, token-class neurons and
neuron ensembles (Lad et al. 2024, after Gurnee et al. 2024, "Universal neurons").

* :func:`neuron_moments`: for every MLP neuron, the moments over the vocabulary of the cosine
  between its output weights and each token's (centred, unit-norm) unembedding, and its kind;
* :func:`neuron_counts`: prediction / suppression / other neurons per layer;
* :func:`token_class_neurons`: neurons whose output weights single out a class of tokens (the
  paper's case study: tokens ending in "-ing"), with the built-in predicates in :data:`PREDICATES`;
* :func:`neuron_ensemble_probe`: does a probe on several such neurons beat each one alone?
* :func:`robustness_by_region`: the robustness of early, middle and late blocks, read from a
  deletion / swap sweep.

Conventions (docs/stages/prediction_ensembling.md): moments are *population* moments over the
vocabulary (divide by ``d_vocab``), exactly as the authors' ``vector_moments`` computes them;
kurtosis is not excess (a Gaussian gives 3). A neuron is "prediction" where kurtosis >
threshold and skew > 0, "suppression" where kurtosis > threshold and skew < 0, else "other".
"""

from __future__ import annotations

import math
import string
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from stages_of_inference._tl import Model
from stages_of_inference._utils import check_count, check_model, check_tokens, relative_depth
from stages_of_inference._utils import progress as _progress
from stages_of_inference.backends import as_seam, require_processed_weights
from stages_of_inference.backends.state import exclusive
from stages_of_inference.batch import Tokens
from stages_of_inference.metrics import NonFiniteError, scored_positions
from stages_of_inference.precision import autocast, check_model_precision
from stages_of_inference.probes import ProbeResult, fit_probe
from stages_of_inference.results import provenance, with_provenance

__all__ = ["KINDS", "MOMENT_COLUMNS", "PREDICATES", "Predicate", "PredicateLike", "REGIONS", "Vocab", "ends_with",
    "is_capitalised", "is_digits", "is_punctuation", "neuron_activations", "neuron_counts",
    "neuron_ensemble_probe", "neuron_moments", "robustness_by_region", "token_class_neurons", "vocabulary"]

KINDS = ("prediction", "suppression", "other")
"""The kinds of neuron :func:`neuron_moments` assigns."""

MOMENT_COLUMNS = ("layer", "neuron", "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt", "kind")

Predicate = Callable[[str], bool]
Vocab = Sequence[str] | Mapping[str, int]
PredicateLike = Predicate | str | Bool[Tensor, " d_vocab"]


# ----------------------------------------------------------------------------- weights


def _mlp_out_weights(model: Model, layer: int) -> Float[Tensor, "d_mlp d_model"]:
    """The output weights ``W_out`` of block ``layer``'s MLP (dense or gated), rows = neurons."""
    if model.cfg.attn_only:
        raise ValueError("the model is attention-only (cfg.attn_only): it has no MLP neurons")
    mlp = as_seam(model).blocks()[layer].mlp
    w_out = as_seam(model).W_out(layer)
    if not isinstance(w_out, Tensor) or w_out.ndim != 2:
        raise ValueError(
            f"block {layer}'s MLP ({type(mlp).__name__}) has no dense [d_mlp, d_model] W_out; "
            "neuron analyses support dense and gated MLPs, not mixtures of experts"
        )
    return w_out


def _unit_unembedding(model: Model) -> tuple[Float[Tensor, "d_model d_vocab"], Float[Tensor, " d_model"]]:
    """W_U in fp32, mean-centred over the vocabulary, each token's column scaled to unit norm;
    returned as ``(columns - their mean over the vocabulary, that mean)``.

    Centring W_U is done here even if the model was loaded with ``center_unembed`` (then it is a
    no-op), so models loaded either way give the same moments. The second centring (of the unit
    columns) is arithmetic: the cosines of a row ``r`` then come out already centred,
    ``cos[t] - mean_t cos[t] = r . (u_t - mean_t u_t)``, and their mean is ``r . mean_t u_t``.
    """
    w_u = as_seam(model).W_U.detach().to(torch.float32, copy=True)  # one copy, then in place
    w_u.sub_(w_u.mean(dim=1, keepdim=True))
    w_u.div_(w_u.norm(dim=0, keepdim=True).clamp_min(1e-12))
    mean_col = w_u.mean(dim=1)
    return w_u.sub_(mean_col[:, None]), mean_col


def _cosine_moments(
    w_rows: Float[Tensor, "n d_model"],
    unembedding: tuple[Float[Tensor, "d_model d_vocab"], Float[Tensor, " d_model"]],
) -> Float[Tensor, "n 4"]:
    """Population mean, variance, skew and (non-excess) kurtosis over the vocabulary of the
    cosine between each row of ``w_rows`` and each unit column of the unembedding
    (``unembedding`` from :func:`_unit_unembedding`).

    fp32 throughout; each power sum is one fused row-wise dot product over the vocabulary. A zero
    row has variance 0 and NaN skew and kurtosis.
    """
    centred, mean_col = unembedding
    rows = w_rows.detach().float()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d_vocab = centred.shape[1]
    mean = rows @ mean_col
    dev = rows @ centred  # cos - its mean over the vocabulary
    dev2 = dev * dev
    m2 = dev2.sum(dim=1) / d_vocab
    m3 = torch.einsum("nv,nv->n", dev2, dev) / d_vocab
    m4 = torch.einsum("nv,nv->n", dev2, dev2) / d_vocab
    safe = torch.where(m2 > 0, m2, torch.full_like(m2, float("nan")))
    return torch.stack([mean, m2, m3 / safe**1.5, m4 / safe**2], dim=1)


def _kind(skew: np.ndarray, kurt: np.ndarray, threshold: float) -> np.ndarray:
    heavy = kurt > threshold  # NaN compares False
    return np.where(heavy & (skew > 0), "prediction", np.where(heavy & (skew < 0), "suppression", "other"))


def _check_layers(model: Model, layers: Sequence[int] | None) -> list[int]:
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    out = [int(layer) for layer in layers]
    bad = [layer for layer in out if not 0 <= layer < n]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has blocks 0 .. {n - 1}")
    if len(set(out)) != len(out):
        raise ValueError(f"layers must not repeat, got {out}")
    return out


def neuron_moments(
    model: Model,
    kurtosis_threshold: float = 10.0,
    *,
    chunk_neurons: int = 512,
    layers: Sequence[int] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Moments over the vocabulary of each MLP neuron's output-weight cosines, and its kind.

    W_U is mean-centred over the vocabulary and each token's column normalised to unit norm; for
    each neuron, ``cos[t]`` is the cosine between its output row ``W_out[layer][neuron]`` and
    column ``t``. Over the vocabulary: ``vocab_mean``, ``vocab_var`` (population variance),
    ``vocab_skew`` = E[z^3] and ``vocab_kurt`` = E[z^4] (not excess: a Gaussian gives 3) of the
    standardised ``z = (cos - mean) / sqrt(var)``; population moments (divided by ``d_vocab``), as
    the authors' code computes them. ``kind`` is "prediction" where kurtosis >
    ``kurtosis_threshold`` and skew > 0, "suppression" where kurtosis > threshold and skew < 0,
    else "other" (also for a neuron whose output row is zero: variance 0, skew and kurtosis NaN).

    Works layer by layer, ``chunk_neurons`` neurons at a time, so memory stays about
    ``chunk_neurons x d_vocab`` numbers (three fp64 copies) whatever the model's size. Gated MLPs
    (SwiGLU) are handled like dense ones: a neuron's output row is ``W_out[neuron]`` either way.

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` with MLPs.
        kurtosis_threshold: the kurtosis above which a neuron is a prediction / suppression one.
        chunk_neurons: neurons per chunk.
        layers: blocks to analyse (default: all).
        progress: show a progress bar over layers.

    Returns:
        One row per neuron: ``layer``, ``neuron``, ``vocab_mean``, ``vocab_var``, ``vocab_skew``,
        ``vocab_kurt``, ``kind``, with provenance in ``attrs``.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=4, d_head=4, d_vocab=50, d_mlp=16, act_fn="relu"))
        >>> df = neuron_moments(m, progress=False)
        >>> df.shape, list(df.columns[-3:])
        ((32, 7), ['vocab_skew', 'vocab_kurt', 'kind'])
    """
    model = check_model(model)
    require_processed_weights(model, "neuron_moments")
    if chunk_neurons < 1:
        raise ValueError(f"chunk_neurons must be a positive number of neurons, got {chunk_neurons}")
    if not math.isfinite(kurtosis_threshold):
        raise ValueError(f"kurtosis_threshold must be a finite number, got {kurtosis_threshold}")
    chosen = _check_layers(model, layers)
    parts: list[pd.DataFrame] = []
    with torch.inference_mode():
        if not bool(torch.isfinite(as_seam(model).W_U).all()):
            raise NonFiniteError("the unembedding W_U holds NaN or infinity")
        unit_w_u = _unit_unembedding(model)
        for layer in _progress(chosen, progress, desc="neuron moments", unit="layer"):
            w_out = _mlp_out_weights(model, layer)
            if not bool(torch.isfinite(w_out).all()):  # (a dead, all-zero neuron has NaN moments by design)
                bad = int((~torch.isfinite(w_out).all(dim=1)).nonzero()[0, 0])
                raise NonFiniteError(f"block {layer}'s MLP output weights hold NaN or infinity (neuron {bad} first)")
            stats = torch.cat(
                [
                    _cosine_moments(w_out[start : start + chunk_neurons], unit_w_u)
                    for start in range(0, w_out.shape[0], chunk_neurons)
                ]
            ).cpu().numpy()
            parts.append(
                pd.DataFrame(
                    {
                        "layer": np.full(w_out.shape[0], layer, dtype=np.int64),
                        "neuron": np.arange(w_out.shape[0], dtype=np.int64),
                        "vocab_mean": stats[:, 0],
                        "vocab_var": stats[:, 1],
                        "vocab_skew": stats[:, 2],
                        "vocab_kurt": stats[:, 3],
                    }
                )
            )
    df = pd.concat(parts, ignore_index=True)
    df["kind"] = _kind(df["vocab_skew"].to_numpy(), df["vocab_kurt"].to_numpy(), kurtosis_threshold)
    return with_provenance(
        df,
        provenance(
            model,
            None,
            analysis="neuron_moments",
            kurtosis_threshold=kurtosis_threshold,
            layers=chosen,
            moments="population (divide by d_vocab); kurtosis not excess",
            unembedding="W_U centred over the vocabulary, unit-norm columns",
        ),
    )


def neuron_counts(moments: pd.DataFrame, n_layers: int | None = None) -> pd.DataFrame:
    """Prediction, suppression and other neurons per layer.

    Args:
        moments: the output of :func:`neuron_moments` (columns ``layer`` and ``kind`` at least).
        n_layers: the model's number of blocks, for ``relative_depth``; default: from the
            moments' provenance, else ``max(layer) + 1``.

    Returns:
        One row per layer present in ``moments``: ``layer``, ``relative_depth``, ``n_neurons``,
        ``n_prediction``, ``n_suppression``, ``n_other``, ``share_prediction``,
        ``share_suppression``.

    Example:
        >>> import pandas as pd
        >>> m = pd.DataFrame({"layer": [0, 0, 1, 1], "kind": ["other", "prediction", "suppression", "suppression"]})
        >>> neuron_counts(m)[["layer", "n_prediction", "n_suppression"]].values.tolist()
        [[0, 1, 0], [1, 0, 2]]
    """
    missing = {"layer", "kind"} - set(moments.columns)
    if missing:
        raise ValueError(f"moments lacks the columns {sorted(missing)}; pass the output of neuron_moments")
    unknown = set(moments["kind"].unique()) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown neuron kinds {sorted(unknown)}; allowed: {KINDS}")
    prov = dict(moments.attrs.get("provenance", {}))
    if n_layers is None:
        n_layers = int(prov.get("model", {}).get("n_layers", int(moments["layer"].max()) + 1))
    if moments.empty:
        raise ValueError("moments is empty: no neurons to count")
    if int(moments["layer"].max()) >= n_layers or int(moments["layer"].min()) < 0:
        raise ValueError(f"layers in moments must lie in 0 .. {n_layers - 1}")
    table = pd.crosstab(moments["layer"], moments["kind"]).reindex(columns=list(KINDS), fill_value=0)
    out = pd.DataFrame(
        {
            "layer": table.index.to_numpy(dtype=np.int64),
            "relative_depth": [relative_depth(int(layer), n_layers) for layer in table.index],
            "n_neurons": table.sum(axis=1).to_numpy(dtype=np.int64),
            "n_prediction": table["prediction"].to_numpy(dtype=np.int64),
            "n_suppression": table["suppression"].to_numpy(dtype=np.int64),
            "n_other": table["other"].to_numpy(dtype=np.int64),
        }
    )
    out["share_prediction"] = out["n_prediction"] / out["n_neurons"]
    out["share_suppression"] = out["n_suppression"] / out["n_neurons"]
    settings = dict(prov.get("settings", {}))
    settings.update(analysis="neuron_counts", n_layers=n_layers)
    prov["settings"] = settings
    return with_provenance(out, prov)


# ----------------------------------------------------------------------------- predicates


def ends_with(suffix: str) -> Predicate:
    """A predicate: the token, stripped of surrounding spaces and lower-cased, ends with ``suffix``
    (the authors' ``suffix_features``).

    Example:
        >>> ends_with("ing")(" Running"), ends_with("ing")(" run")
        (True, False)
    """
    if not suffix:
        raise ValueError("suffix must be a non-empty string")
    suffix = suffix.lower()

    def predicate(token: str) -> bool:
        return token.strip().lower().endswith(suffix)

    predicate.__name__ = f"ends_with_{suffix}"
    return predicate


def is_capitalised(token: str) -> bool:
    """The token's first non-space character is an upper-case letter.

    Example:
        >>> is_capitalised(" The"), is_capitalised("the"), is_capitalised(" ")
        (True, False, False)
    """
    stripped = token.strip()
    return bool(stripped) and stripped[0].isupper()


def is_digits(token: str) -> bool:
    """The token, stripped of spaces, is a non-empty run of decimal digits.

    Example:
        >>> is_digits(" 1984"), is_digits("19th")
        (True, False)
    """
    stripped = token.strip()
    return bool(stripped) and stripped.isdecimal()


def is_punctuation(token: str) -> bool:
    r"""The token, stripped of spaces, is non-empty and every character is punctuation
    (Unicode category P*, or an ASCII punctuation character).

    Example:
        >>> is_punctuation(" ,"), is_punctuation("...\""), is_punctuation("a.")
        (True, True, False)
    """
    stripped = token.strip()
    return bool(stripped) and all(
        c in string.punctuation or unicodedata.category(c).startswith("P") for c in stripped
    )


PREDICATES: dict[str, Predicate] = {
    "ends_with_ing": ends_with("ing"),
    "ends_with_ed": ends_with("ed"),
    "ends_with_ly": ends_with("ly"),
    "ends_with_tion": ends_with("tion"),
    "capitalised": is_capitalised,
    "digits": is_digits,
    "punctuation": is_punctuation,
}
"""Built-in token predicates by name; any ``str -> bool`` function works as well."""


def vocabulary(model: Model, vocab: Vocab | None = None) -> list[str | None]:
    """The string of every token id ``0 .. d_vocab - 1`` (``None`` where unknown).

    Args:
        model: the model (its tokenizer is used when ``vocab`` is None).
        vocab: token strings indexed by id (a sequence), or a mapping string -> id (e.g. a
            tokenizer's ``get_vocab()``; note that such raw strings may carry markers like "Ġ").

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=3, act_fn="relu"))
        >>> vocabulary(m, {"a": 0, "b": 2})
        ['a', None, 'b']
    """
    d_vocab = as_seam(model).d_vocab
    out: list[str | None] = [None] * d_vocab
    if vocab is None:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "the model has no tokenizer: pass vocab= (token strings by id, or a mapping string -> id)"
            )
        n = min(d_vocab, len(tokenizer))
        decoded = tokenizer.batch_decode([[i] for i in range(n)])
        out[:n] = list(decoded)
        return out
    if isinstance(vocab, Mapping):
        for text, index in vocab.items():
            if not 0 <= int(index) < d_vocab:
                raise ValueError(f"vocab maps {text!r} to id {index}, outside 0 .. {d_vocab - 1}")
            out[int(index)] = str(text)
        return out
    if isinstance(vocab, str) or len(vocab) > d_vocab:
        raise ValueError(f"vocab must be a sequence of at most d_vocab = {d_vocab} token strings")
    out[: len(vocab)] = [str(v) for v in vocab]
    return out


def _property_mask(
    model: Model, predicate: PredicateLike, vocab: Vocab | None
) -> tuple[Bool[Tensor, " d_vocab"], Bool[Tensor, " d_vocab"]]:
    """(has the property, is a known token) over the vocabulary."""
    d_vocab = as_seam(model).d_vocab
    if isinstance(predicate, Tensor):
        if predicate.dtype != torch.bool or predicate.shape != (d_vocab,):
            raise ValueError(f"a mask predicate must be a bool tensor of shape [{d_vocab}]")
        return predicate.cpu(), torch.ones(d_vocab, dtype=torch.bool)
    if isinstance(predicate, str):
        if predicate not in PREDICATES:
            raise ValueError(f"unknown predicate {predicate!r}; built-in: {', '.join(PREDICATES)}")
        predicate = PREDICATES[predicate]
    if not callable(predicate):
        raise TypeError("predicate must be a function str -> bool, a built-in name, or a bool mask")
    strings = vocabulary(model, vocab)
    known = torch.tensor([s is not None for s in strings], dtype=torch.bool)
    has = torch.tensor([s is not None and bool(predicate(s)) for s in strings], dtype=torch.bool)
    return has, known


def _predicate_name(predicate: PredicateLike) -> str:
    if isinstance(predicate, str):
        return predicate
    if isinstance(predicate, Tensor):
        return "mask"
    return getattr(predicate, "__name__", repr(predicate))


def token_class_neurons(
    model: Model,
    predicate: PredicateLike,
    top: int = 20,
    *,
    vocab: Vocab | None = None,
    layers: Sequence[int] | None = None,
    kurtosis_threshold: float = 10.0,
) -> pd.DataFrame:
    """Neurons whose output weights single out a class of tokens (the paper's "-ing" case study).

    Each neuron is scored by ``mean over tokens with the property - mean over the other tokens``
    of its raw direct logit effect ``W_U^T w_out`` (the model's W_U as it is: centring W_U would
    shift every token alike and leave the score unchanged). The ``top`` neurons by absolute score
    are returned with their kind (:func:`neuron_moments`' rule, computed for these neurons).

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge`` with MLPs.
        predicate: ``str -> bool`` over decoded token strings, a name in :data:`PREDICATES`, or a
            bool mask over the vocabulary.
        top: how many neurons to return.
        vocab: token strings (see :func:`vocabulary`); default: decode with the model's tokenizer.
        layers: blocks to search (default: all).
        kurtosis_threshold: as in :func:`neuron_moments`.

    Returns:
        ``rank``, ``layer``, ``neuron``, ``relative_depth``, ``score`` (positive: the neuron pushes
        the class up), ``abs_score``, ``vocab_skew``, ``vocab_kurt``, ``kind``; best first.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=4, d_head=4, d_vocab=6, d_mlp=16, act_fn="relu"))
        >>> words = ["sing", "run", "going", "cat", "dog", "be"]
        >>> token_class_neurons(m, "ends_with_ing", top=3, vocab=words).shape
        (3, 9)
    """
    model = check_model(model)
    require_processed_weights(model, "token_class_neurons")
    if top < 1:
        raise ValueError(f"top must be a positive number of neurons, got {top}")
    chosen = _check_layers(model, layers)
    has, known = _property_mask(model, predicate, vocab)
    rest = known & ~has
    n_has, n_rest = int(has.sum()), int(rest.sum())
    if n_has == 0 or n_rest == 0:
        raise ValueError(
            f"the predicate selects {n_has} of {int(known.sum())} known tokens: need at least one "
            "token with the property and one without"
        )
    with torch.inference_mode():
        w_u = as_seam(model).W_U.detach().float()
        weights = has.float() / n_has - rest.float() / n_rest
        direction = w_u @ weights.to(w_u.device)  # [d_model]: mean(has) - mean(rest) of W_U columns
        scores = torch.cat([_mlp_out_weights(model, layer).float() @ direction for layer in chosen])
        d_mlp = scores.shape[0] // len(chosen)
        k = min(top, scores.shape[0])
        best = scores.abs().topk(k).indices
        layer_of = torch.tensor(chosen, dtype=torch.long)[best.cpu() // d_mlp]
        neuron_of = best.cpu() % d_mlp
        rows = torch.stack([_mlp_out_weights(model, int(l))[int(j)] for l, j in zip(layer_of, neuron_of)])
        stats = _cosine_moments(rows, _unit_unembedding(model)).cpu().numpy()
        picked = scores[best].cpu().double().numpy()
    df = pd.DataFrame(
        {
            "rank": np.arange(1, k + 1, dtype=np.int64),
            "layer": layer_of.numpy().astype(np.int64),
            "neuron": neuron_of.numpy().astype(np.int64),
            "relative_depth": [relative_depth(int(l), model.cfg.n_layers) for l in layer_of],
            "score": picked,
            "abs_score": np.abs(picked),
            "vocab_skew": stats[:, 2],
            "vocab_kurt": stats[:, 3],
        }
    )
    df["kind"] = _kind(df["vocab_skew"].to_numpy(), df["vocab_kurt"].to_numpy(), kurtosis_threshold)
    return with_provenance(
        df,
        provenance(
            model,
            None,
            analysis="token_class_neurons",
            predicate=_predicate_name(predicate),
            n_tokens_with_property=n_has,
            n_tokens_without=n_rest,
            top=top,
            layers=chosen,
            kurtosis_threshold=kurtosis_threshold,
        ),
    )


# ----------------------------------------------------------------------------- probes


def _neuron_list(model: Model, neurons: Any) -> list[tuple[int, int]]:
    if isinstance(neurons, pd.DataFrame):
        if not {"layer", "neuron"} <= set(neurons.columns):
            raise ValueError("a neuron table needs the columns 'layer' and 'neuron'")
        pairs = [(int(l), int(j)) for l, j in neurons[["layer", "neuron"]].itertuples(index=False)]
    else:
        try:
            pairs = [(int(l), int(j)) for l, j in neurons]
        except (TypeError, ValueError):
            raise TypeError("neurons must be (layer, neuron) pairs or a table with 'layer' and 'neuron' columns") from None
    if not pairs:
        raise ValueError("neurons is empty: pass at least one (layer, neuron) pair")
    if len(set(pairs)) != len(pairs):
        raise ValueError("neurons must not repeat")
    for layer, neuron in pairs:
        if not 0 <= layer < model.cfg.n_layers:
            raise ValueError(f"layer {layer} out of range: 0 .. {model.cfg.n_layers - 1}")
        d_mlp = _mlp_out_weights(model, layer).shape[0]
        if not 0 <= neuron < d_mlp:
            raise ValueError(f"neuron {neuron} out of range for layer {layer}: 0 .. {d_mlp - 1}")
    return pairs


def neuron_activations(
    model: Model,
    tokens: Tokens,
    neurons: Sequence[tuple[int, int]] | pd.DataFrame,
    *,
    batch_size: int = 8,
    progress: bool = True,
    precision: str = "fp32",
) -> Float[Tensor, "batch pos neuron"]:
    """Activations (``blocks.{layer}.mlp.hook_post``, fp32) of the given neurons at every position.

    The forward pass stops after the deepest block needed; it runs in ``precision``
    (:mod:`stages_of_inference.precision`), the activations are returned in fp32.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=4, d_head=4, d_mlp=16, d_vocab=5, act_fn="relu"))
        >>> neuron_activations(m, torch.tensor([[0, 1, 2]]), [(0, 3), (1, 5)], progress=False).shape
        torch.Size([1, 3, 2])
    """
    model = check_model(model)
    tokens = check_tokens(model, tokens, min_len=1)
    pairs = _neuron_list(model, neurons)
    batch_size = check_count(batch_size, "batch_size", "a positive number of sequences")
    precision = check_model_precision(as_seam(model).W_U.dtype, precision, model.cfg.device)
    by_layer: dict[int, list[int]] = {}
    for column, (layer, _) in enumerate(pairs):
        by_layer.setdefault(layer, []).append(column)
    stop = max(by_layer) + 1
    with torch.inference_mode():
        out = torch.empty(*tokens.shape, len(pairs), dtype=torch.float32, device=tokens.device)
        for start in _progress(range(0, tokens.shape[0], batch_size), progress, desc="neuron activations"):
            rows = slice(start, start + batch_size)
            hooks = []
            for layer, columns in by_layer.items():
                index = torch.tensor([pairs[c][1] for c in columns], device=tokens.device)
                target = torch.tensor(columns, device=tokens.device)

                def hook(act: Tensor, hook: Any, index: Tensor = index, target: Tensor = target) -> None:
                    out[rows, :, target] = act.index_select(-1, index.to(act.device)).float().to(out.device)

                hooks.append((f"blocks.{layer}.mlp.hook_post", hook))
            with autocast(precision, model.cfg.device):
                with exclusive(model):
                    model.run_with_hooks(tokens[rows], fwd_hooks=hooks, stop_at_layer=stop)
    return out


def _labels_from(
    model: Model,
    tokens: Tokens,
    label: Any,
    vocab: Vocab | None,
) -> Tensor:
    """Per-position labels ``[batch, pos]``; a predicate labels position p by token p + 1."""
    if isinstance(label, Tensor) and label.ndim == 2:
        if label.shape != tokens.shape:
            raise ValueError(f"a label tensor must have the tokens' shape {tuple(tokens.shape)}, got {tuple(label.shape)}")
        if label.dtype.is_floating_point:
            raise TypeError("labels must be integer or bool classes, not floats")
        return label.to(tokens.device)
    has, _ = _property_mask(model, label, vocab)
    has = has.to(tokens.device)
    out = torch.zeros_like(tokens, dtype=torch.bool)
    out[:, :-1] = has[tokens[:, 1:]]
    return out


def neuron_ensemble_probe(
    model: Model,
    tokens: Tokens,
    neurons: Sequence[tuple[int, int]] | pd.DataFrame,
    label: Any,
    *,
    vocab: Vocab | None = None,
    balance: bool = False,
    test_fraction: float = 0.25,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    precision: str = "fp32",
) -> pd.DataFrame:
    """Probe accuracy of each neuron's activation alone against a probe on all of them together.

    Activations are read at ``blocks.{layer}.mlp.hook_post`` on the scored positions ``1 .. T-2``
    (:func:`stages_of_inference.metrics.scored_positions`); every probe is
    :func:`stages_of_inference.probes.fit_probe` with the same held-out split (``test_fraction``,
    ``seed``).

    Args:
        model: a ``HookedTransformer`` or a ``TransformerBridge``.
        tokens: ``[batch, pos]`` token ids, BOS first.
        neurons: ``(layer, neuron)`` pairs, or a table with ``layer`` and ``neuron`` columns (e.g.
            from :func:`token_class_neurons`).
        label: the class of each position: an integer / bool tensor shaped like ``tokens``; or a
            token predicate (as in :func:`token_class_neurons`), meaning "the next token has the
            property" (position ``p`` is labelled by token ``p + 1``).
        vocab: token strings for a string predicate (see :func:`vocabulary`).
        balance: keep an equal number of positions of every class (a seeded random subset of
            each, as many as the rarest class has), so that the majority baseline is chance; for
            rare classes such as "-ing" tokens, plain accuracy hardly moves off the baseline.
        test_fraction: the held-out share of the split shared by all probes.
        seed: the seed of that split (it also draws the balanced subset).
        batch_size: sequences per forward pass.
        progress: show a progress bar.
        precision: the dtype of the model's products (:func:`neuron_activations`).

    Returns:
        One row per neuron (``probe`` = "neuron") and one for the ensemble (``probe`` =
        "ensemble"; ``layer`` and ``neuron`` are missing there): ``n_features``, ``accuracy``
        (held out), ``baseline`` (held-out accuracy of always answering the training set's
        majority class), ``train_accuracy``, ``n_train``, ``n_test``.

    Example:
        >>> import torch
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> m = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8, d_head=4, d_mlp=8, d_vocab=5, act_fn="relu"))
        >>> toks = torch.randint(0, 5, (16, 8)); lab = toks % 2 == 0
        >>> df = neuron_ensemble_probe(m, toks, [(0, 0), (0, 1)], lab, progress=False)
        >>> df["probe"].tolist()
        ['neuron', 'neuron', 'ensemble']
    """
    model = check_model(model)
    source, tokens = tokens, check_tokens(model, tokens)
    pairs = _neuron_list(model, neurons)
    labels = _labels_from(model, tokens, label, vocab)
    keep = scored_positions(tokens.shape[1])
    acts = neuron_activations(model, tokens, pairs, batch_size=batch_size, progress=progress, precision=precision)
    features = acts[:, keep].reshape(-1, len(pairs)).cpu()
    y = labels[:, keep].reshape(-1).long().cpu()
    if y.unique().numel() < 2:
        raise ValueError("the labels on the scored positions are all one class: nothing to probe")
    if balance:
        gen = torch.Generator().manual_seed(seed)
        groups = [torch.nonzero(y == c).flatten() for c in y.unique()]
        m = min(len(g) for g in groups)
        if m < 2:
            raise ValueError("balance=True needs at least two positions of every class")
        keep_rows = torch.cat([g[torch.randperm(len(g), generator=gen)[:m]] for g in groups]).sort().values
        features, y = features[keep_rows], y[keep_rows]
    rows = []
    for column, (layer, neuron) in enumerate(pairs):
        result = fit_probe(features[:, [column]], y, test_fraction=test_fraction, seed=seed)
        rows.append(_probe_row("neuron", layer, neuron, 1, result))
    result = fit_probe(features, y, test_fraction=test_fraction, seed=seed)
    rows.append(_probe_row("ensemble", None, None, len(pairs), result))
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    df["neuron"] = df["neuron"].astype("Int64")
    return with_provenance(
        df,
        provenance(
            model,
            source,
            analysis="neuron_ensemble_probe",
            neurons=[list(p) for p in pairs],
            label=_predicate_name(label) if not (isinstance(label, Tensor) and label.ndim == 2) else "tensor",
            balance=balance,
            test_fraction=test_fraction,
            seed=seed,
            n_positions=int(y.numel()),
            positive_rate=float(y.float().mean()) if y.max() <= 1 else None,
            precision=precision,
        ),
    )


def _probe_row(probe: str, layer: int | None, neuron: int | None, n_features: int, result: ProbeResult) -> dict[str, Any]:
    return {
        "probe": probe,
        "layer": layer,
        "neuron": neuron,
        "n_features": n_features,
        "accuracy": float(result.accuracy),
        "baseline": float(result.baseline),
        "train_accuracy": float(result.train_accuracy),
        "n_train": int(result.n_train),
        "n_test": int(result.n_test),
    }


# ----------------------------------------------------------------------------- interventions

REGIONS = ("first", "early", "middle", "late", "last")


def robustness_by_region(sweep: Any, cuts: tuple[float, float] = (1 / 3, 2 / 3)) -> pd.DataFrame:
    """How robust early, middle and late blocks are, read from a deletion / swap sweep.

    Blocks are grouped by relative depth: "first" (the lowest ``layer`` of the kind), "early"
    (depth < ``cuts[0]``), "middle" (``cuts[0]`` <= depth < ``cuts[1]``), "late" (depth >=
    ``cuts[1]``) and "last" (the highest ``layer``); the first and last blocks are kept apart
    because they are the fragile ones (PAPER.md) and would otherwise dominate their region's mean.
    The paper's prediction-ensembling evidence is that middle blocks cost little (many
    redundant contributions, an ensemble) while the last ones do not.

    Args:
        sweep: a sweep summary (columns ``kind``, ``layer``, ``relative_depth``, ``kl_nats``,
            ``loss_delta``, ``relative_accuracy``, ``top1_agreement``), or an object with such a
            ``.summary`` (a :class:`stages_of_inference.SweepResult`).
        cuts: the two relative depths between early / middle / late.

    Returns:
        One row per (intervention ``kind``, ``region``): ``n_blocks``, ``layers``, ``depth_lo``,
        ``depth_hi``, mean and worst ``kl_nats``, ``loss_delta``, ``relative_accuracy``, mean
        ``top1_agreement``.

    Example:
        >>> import pandas as pd
        >>> s = pd.DataFrame({"kind": ["none"] + ["drop"] * 4, "layer": [-1, 0, 1, 2, 3],
        ...     "relative_depth": [float("nan"), 0, 1/3, 2/3, 1], "kl_nats": [0, 8, .1, .2, 2],
        ...     "loss_delta": [0, 7, .1, .2, 1.5], "relative_accuracy": [1, .1, .98, .95, .7],
        ...     "top1_agreement": [1, .1, .9, .9, .6]})
        >>> robustness_by_region(s)[["region", "mean_kl_nats"]].values.tolist()
        [['first', 8.0], ['middle', 0.1], ['late', 0.2], ['last', 2.0]]
    """
    summary = getattr(sweep, "summary", sweep)
    if not isinstance(summary, pd.DataFrame):
        raise TypeError("pass a sweep summary DataFrame or a result with a .summary DataFrame")
    needed = {"kind", "layer", "relative_depth", "kl_nats", "loss_delta", "relative_accuracy", "top1_agreement"}
    missing = needed - set(summary.columns)
    if missing:
        raise ValueError(f"the sweep summary lacks the columns {sorted(missing)}")
    lo, hi = cuts
    if not 0 < lo < hi < 1:
        raise ValueError(f"cuts must satisfy 0 < cuts[0] < cuts[1] < 1, got {cuts}")
    rows = []
    for kind, group in summary[summary["kind"] != "none"].groupby("kind", sort=False):
        first, last = group["layer"].min(), group["layer"].max()
        depth = group["relative_depth"]
        region = np.where(
            group["layer"] == first,
            "first",
            np.where(group["layer"] == last, "last", np.where(depth < lo, "early", np.where(depth < hi, "middle", "late"))),
        )
        for name in REGIONS:
            part = group[region == name]
            if part.empty:
                continue
            rows.append(
                {
                    "kind": kind,
                    "region": name,
                    "n_blocks": len(part),
                    "layers": ",".join(str(int(v)) for v in sorted(part["layer"])),
                    "depth_lo": float(part["relative_depth"].min()),
                    "depth_hi": float(part["relative_depth"].max()),
                    "mean_kl_nats": float(part["kl_nats"].mean()),
                    "max_kl_nats": float(part["kl_nats"].max()),
                    "mean_loss_delta": float(part["loss_delta"].mean()),
                    "max_loss_delta": float(part["loss_delta"].max()),
                    "mean_relative_accuracy": float(part["relative_accuracy"].mean()),
                    "min_relative_accuracy": float(part["relative_accuracy"].min()),
                    "mean_top1_agreement": float(part["top1_agreement"].mean()),
                }
            )
    if not rows:
        raise ValueError("the sweep summary holds no interventions (only kind == 'none')")
    prov = dict(summary.attrs.get("provenance", {}))
    settings = dict(prov.get("settings", {}))
    settings.update(analysis="robustness_by_region", cuts=list(cuts))
    prov["settings"] = settings
    return with_provenance(pd.DataFrame(rows), prov)
