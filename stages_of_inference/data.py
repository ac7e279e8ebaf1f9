"""Text corpora to token batches.

``load_tokens`` turns a corpus into an ``[n_sequences, seq_len]`` batch: BOS first in every row,
then ``seq_len - 1`` consecutive tokens of one document. Each document is cut into
non-overlapping windows of ``seq_len - 1`` tokens that *begin at the start of a sentence or
paragraph* (the token holding the first character after ``.``, ``!`` or ``?`` and white space,
or after a blank line), so that no row opens in the middle of a word or sentence: the paper's
rows were the beginnings of documents, and a row that opens mid-word costs the first few
predictions 8 to 20 nats for no reason a study of depth cares about. Windows are taken greedily
from each boundary that lies past the end of the previous window; tokenizers without character
offsets (slow Python tokenizers) fall back to back-to-back windows. The windows to use are drawn
without replacement by a seeded generator, so a seed always gives the same batch for the same
tokenizer and corpus.

A corpus is one of:

* a bundled name: ``"default"`` (Austen's six novels and Melville's Moby Dick, public domain),
  ``"austen"`` or ``"melville"``; see ``stages_of_inference/corpora/PROVENANCE.md``;
* a path to a text file (one document) or a folder (every ``*.txt`` file in it, sorted by name,
  one document each);
* any iterable of strings (one document each);
* a Hugging Face dataset name, where the hub (or a local datasets cache) is reachable: documents
  are read in order from its ``text_column``, streaming, until there are
  ``POOL_FACTOR x n_sequences`` windows to draw from (the paper used the first documents of the
  Pile; ``"NeelNanda/pile-10k"`` is a small copy of them).

Bundled and file corpora are finite, so every window is in the pool; streamed corpora (datasets,
generators) are read only as far as the pool needs.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import lzma
import os
import re
import stat
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from stages_of_inference._tl import Model
from stages_of_inference._utils import check_count, check_model
from stages_of_inference.batch import DIGEST_CHARS, TokenBatch
from stages_of_inference.models import CorpusNotAvailableError, bos_token_id, bounded_hub_requests, hub_problem

__all__ = ["BUNDLED", "POOL_FACTOR", "check_corpus", "corpus_documents", "corpus_names", "corpus_texts", "load_token_batch", "load_tokens"]

BUNDLED = {
    "austen": (
        "austen_emma",
        "austen_mansfieldpark",
        "austen_northangerabbey",
        "austen_persuasion",
        "austen_prideprejudice",
        "austen_sensesensibility",
    ),
    "melville": ("mobydick",),
}
BUNDLED["default"] = BUNDLED["austen"] + BUNDLED["melville"]
POOL_FACTOR = 4
"""A streamed corpus is read until it yields this many windows per requested sequence."""


def corpus_names() -> list[str]:
    """Names of the bundled corpora.

    Example:
        >>> corpus_names()
        ['austen', 'default', 'melville']
    """
    return sorted(BUNDLED)


@functools.lru_cache(maxsize=16)
def _bundled_document(stem: str) -> str:
    data = resources.files("stages_of_inference").joinpath("corpora", f"{stem}.txt.xz").read_bytes()
    return lzma.decompress(data).decode("utf-8")


def corpus_texts(name: str = "default") -> list[str]:
    """The documents of a bundled corpus, one string per novel.

    Example:
        >>> docs = corpus_texts("melville")
        >>> len(docs), docs[0][:23]
        (1, 'MOBY DICK; OR THE WHALE')
    """
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled corpus {name!r}; bundled corpora: {', '.join(corpus_names())}")
    return [_bundled_document(stem) for stem in BUNDLED[name]]


def check_corpus(corpus: Any) -> None:
    """Refuse, without reading it, a corpus named by a string that cannot be had here: a path that
    does not exist (``FileNotFoundError``), or a dataset name while the hub does not answer
    (:class:`~stages_of_inference.models.CorpusNotAvailableError`, in bounded time). Bundled
    names, existing paths and iterables pass; their content is checked when it is read.

    Example:
        >>> check_corpus("austen")
        >>> check_corpus("./no-such-corpus.txt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no such corpus file or folder: ./no-such-corpus.txt
    """
    if not isinstance(corpus, (str, os.PathLike)):
        return
    key = os.fspath(corpus)
    path = Path(key).expanduser()
    if key in BUNDLED or path.is_dir():
        return
    if os.path.lexists(path):
        _check_regular(path)
        return
    if key.startswith(("/", "./", "../", "~")) or key.endswith(".txt"):
        raise FileNotFoundError(f"no such corpus file or folder: {key}")
    _require_hub(key)


def _require_hub(name: str) -> None:
    """A dataset name is readable only where the hub answers: asked now, in bounded time."""
    problem = hub_problem()
    if problem is not None:
        raise CorpusNotAvailableError(
            f"{name!r} is not a bundled corpus ({', '.join(corpus_names())}) or an existing path, and as a Hugging "
            f"Face dataset it cannot be read: the hub is not reachable ({problem}); pass a bundled name, a text file "
            "or folder, or a list of strings"
        )


def _documents(corpus: Any, text_column: str, split: str) -> tuple[Iterable[Any], bool, str]:
    """(documents, finite, description) of any accepted corpus."""
    if isinstance(corpus, (str, os.PathLike)):
        key = os.fspath(corpus)
        if key in BUNDLED:
            return corpus_texts(key), True, f"bundled:{key}"
        path = Path(key).expanduser()
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise ValueError(f"the folder {path} holds no .txt files")
            for file in files:  # every one checked before any is opened: a FIFO would block the read
                _check_regular(file)
            return [_read_text(f) for f in files], True, f"folder:{path.name}"
        if os.path.lexists(path):
            _check_regular(path)
            return [_read_text(path)], True, f"file:{path.name}"
        check_corpus(key)  # a missing path, or a dataset name without a hub, is refused here
        return _hf_dataset(key, text_column, split), False, f"hf:{key}"
    if isinstance(corpus, Iterable):
        finite = isinstance(corpus, (list, tuple))
        return corpus, finite, "iterable"
    raise TypeError(
        f"corpus must be a bundled name ({', '.join(corpus_names())}), a path, an iterable of "
        f"strings or a Hugging Face dataset name, got {type(corpus).__name__}"
    )


def corpus_documents(corpus: str | os.PathLike[str]) -> list[str]:
    """Every document of a finite corpus, in full: a bundled corpus, a text file, or a folder of
    ``.txt`` files (what a study's corpus may be; a Hugging Face dataset streams and is refused).

    Example:
        >>> len(corpus_documents("austen"))
        6
    """
    documents, finite, _ = _documents(corpus, "text", "train")
    if not finite:
        raise ValueError(f"corpus {os.fspath(corpus)!r} is a dataset stream; give a bundled corpus, a text file or a folder")
    return list(documents)


def _check_regular(path: Path) -> None:
    """A corpus file must be a regular file (a FIFO, a device or a socket is never opened)."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise ValueError(f"the corpus file {path} cannot be read: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"the corpus file {path} is not a regular file (a pipe, a device or a socket); "
                         "give text files")


def _read_text(path: Path) -> str:
    """A corpus file's text, or one line naming the file when it is not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"the corpus file {path} is not UTF-8 text (byte {error.start} cannot be decoded); "
                         "give a UTF-8 text file, or convert it first (e.g. iconv -f latin1 -t utf-8)") from None
    except OSError as error:
        raise ValueError(f"the corpus file {path} cannot be read: {error.strerror or error}") from None


def _hf_dataset(name: str, text_column: str, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets comes with transformer-lens
        raise ValueError(
            f"{name!r} is not a bundled corpus or a path, and the 'datasets' package needed to read "
            f"it as a Hugging Face dataset is not installed. Bundled corpora: {', '.join(corpus_names())}"
        ) from None
    with bounded_hub_requests():
        stream = datasets.load_dataset(name, split=split, streaming=True)
        yield from _rows(stream, name, text_column)


def _rows(stream: Iterable[Any], name: str, text_column: str) -> Iterator[str]:
    for row in stream:
        if text_column not in row:
            raise ValueError(f"dataset {name!r} has no column {text_column!r}; columns: {', '.join(row)}")
        yield row[text_column]


def load_tokens(
    model: Model,
    corpus: Any = "default",
    n_sequences: int = 8,
    seq_len: int = 128,
    seed: int = 0,
    *,
    text_column: str = "text",
    split: str = "train",
) -> Int[Tensor, "batch pos"]:
    """The token ids of :func:`load_token_batch` (same arguments), as a plain tensor.

    Example:
        >>> from stages_of_inference.data import corpus_names
        >>> "default" in corpus_names()
        True
    """
    return load_token_batch(model, corpus, n_sequences, seq_len, seed, text_column=text_column, split=split).tokens


def load_token_batch(
    model: Model,
    corpus: Any = "default",
    n_sequences: int = 8,
    seq_len: int = 128,
    seed: int = 0,
    *,
    text_column: str = "text",
    split: str = "train",
) -> TokenBatch:
    """A batch of token sequences from a corpus, BOS first, for ``model``'s tokenizer, that
    records its corpus (and, for files and folders, the digest of their text) and seed.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` with a tokenizer (its BOS policy: :func:`bos_token_id`).
        corpus: a bundled corpus name, a path, an iterable of strings, or a dataset name (module
            docstring).
        n_sequences: number of rows.
        seq_len: tokens per row, BOS included; at most the model's context length.
        seed: which windows are drawn.
        text_column: the text column of a Hugging Face dataset.
        split: the split of a Hugging Face dataset.

    Returns:
        A :class:`~stages_of_inference.batch.TokenBatch` of ``[n_sequences, seq_len]`` token ids
        on the model's device.

    Example:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> words = ["<bos>", "<unk>", "the", "whale", "sea", "ship", "."]
        >>> tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")
        >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=16, d_head=4, d_vocab=6, act_fn="relu")
        >>> model = HookedTransformer(cfg)
        >>> model.tokenizer = tokenizer  # normally set by load_model
        >>> batch = load_token_batch(model, ["the whale. the sea. the ship."], n_sequences=2, seq_len=4)
        >>> batch.tokens
        tensor([[0, 2, 5, 6],
                [0, 2, 3, 6]])
        >>> batch.corpus, batch.seed
        ('iterable', 0)
    """
    model = check_model(model)
    n_sequences = check_count(n_sequences, "n_sequences")
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer; tokenize the text yourself (BOS first in every row)")
    if not isinstance(seq_len, int) or seq_len < 3:
        raise ValueError(f"seq_len must be an integer of at least 3 (BOS plus two text tokens), got {seq_len!r}")
    if seq_len > model.cfg.n_ctx:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context of {model.cfg.n_ctx} tokens")
    width = seq_len - 1
    documents, finite, description = _documents(corpus, text_column, split)
    tokenizer = model.tokenizer

    windows: list[list[int]] = []
    n_documents = n_characters = longest = 0
    # the digest of the text says which text a path held (a bundled name or a dataset names its own)
    text_digest = hashlib.sha256() if description.startswith(("file:", "folder:")) else None
    for document in documents:
        if not isinstance(document, str):
            raise TypeError(f"every document must be a str, got {type(document).__name__}")
        n_documents += 1
        n_characters += len(document)
        if text_digest is not None:
            text_digest.update(document.encode("utf-8", errors="surrogatepass") + b"\0")
        ids, starts = _tokenize(tokenizer, document, cache_key=description if finite else None)
        longest = max(longest, len(ids))
        windows.extend(ids[start : start + width] for start in _window_starts(starts, len(ids), width))
        if not finite and len(windows) >= POOL_FACTOR * n_sequences:
            break
    if n_characters == 0:
        raise ValueError(f"the corpus ({description}) is empty: it holds no text")
    if len(windows) < n_sequences and n_documents > 1 and longest < width:
        raise ValueError(
            f"the corpus ({description}) holds {n_documents} documents, each shorter than one window of {width} "
            f"tokens (the longest: {longest} tokens); a window never spans two documents: join the files into one "
            "text, or ask for a shorter seq_len")
    if len(windows) < n_sequences:
        raise ValueError(
            f"the corpus ({description}, {n_documents} documents, {n_characters:,} characters) yields "
            f"only {len(windows)} windows of {width} tokens, fewer than the {n_sequences} sequences of "
            f"seq_len {seq_len} asked for: ask for fewer or shorter sequences, or give more text"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(windows), generator=generator)[:n_sequences].tolist()
    bos = bos_token_id(model)
    rows = [[bos, *windows[i]] for i in chosen]
    tokens = torch.tensor(rows, dtype=torch.long, device=model.cfg.device)
    name = os.fspath(corpus) if isinstance(corpus, (str, os.PathLike)) else description
    return TokenBatch(tokens, corpus=name, seed=seed,
                      corpus_sha256=None if text_digest is None else text_digest.hexdigest()[:DIGEST_CHARS])


_TOKEN_CACHE: dict[tuple[Any, ...], tuple[list[int], list[int] | None]] = {}
# A sentence ends at . ! or ? (not after a title such as "Mr."), maybe closing quotes or brackets,
# then white space; a paragraph ends at a blank line.
_BOUNDARY = re.compile(
    r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)[.!?][\"'\u201d\u2019)\]]*\s+|\n\s*\n"
)


def _tokenize(tokenizer: Any, text: str, cache_key: str | None = None) -> tuple[list[int], list[int] | None]:
    """Token ids of ``text`` (no special tokens) and the indices of the tokens that begin a
    sentence or paragraph (``None`` when the tokenizer gives no character offsets).

    Results for finite corpora are kept for the life of the process, keyed by tokenizer, corpus
    and text, so that repeated calls (tests, notebooks) do not re-tokenize a novel.
    """
    key = None
    if cache_key is not None:
        key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), type(tokenizer).__name__,
               cache_key, len(text), hash(text))
        if key in _TOKEN_CACHE:
            return _TOKEN_CACHE[key]
    try:
        encoded = tokenizer(text, add_special_tokens=False, verbose=False, return_offsets_mapping=True)
        token_starts = [start for start, _ in encoded["offset_mapping"]]
    except (NotImplementedError, KeyError, TypeError):  # slow tokenizers give no offsets
        encoded, token_starts = tokenizer(text, add_special_tokens=False, verbose=False), None
    ids = list(encoded["input_ids"])
    starts = None
    if token_starts is not None:
        # The token that holds each boundary character (its start may be the space before it).
        chars = [0] + [m.end() for m in _BOUNDARY.finditer(text) if m.end() < len(text)]
        starts = sorted({max(bisect.bisect_right(token_starts, c) - 1, 0) for c in chars})
    result = (ids, starts)
    if key is not None:
        _TOKEN_CACHE[key] = result
    return result


def _window_starts(starts: list[int] | None, n_ids: int, width: int) -> list[int]:
    """First token of each window: greedily, every boundary past the previous window's end."""
    if starts is None:
        return list(range(0, n_ids - width + 1, width))
    chosen, free = [], 0
    for start in starts:
        if start >= free and start + width <= n_ids:
            chosen.append(start)
            free = start + width
    return chosen
