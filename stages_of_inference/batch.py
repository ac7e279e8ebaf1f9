"""A token batch that knows where it came from.

:class:`TokenBatch` pairs the ``[batch, pos]`` token ids with the corpus they were drawn from and
the seed that drew them, so that every result made from it can record its data explicitly. Every
analysis accepts either a ``TokenBatch`` or a plain token tensor (whose corpus is then unknown);
:func:`token_digest` is the one digest of token ids used across the package (provenance, study
fingerprints, sweep checkpoints).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["DIGEST_CHARS", "TokenBatch", "Tokens", "describe_any", "describe_tokens", "tensor_of", "token_digest"]

DIGEST_CHARS = 24
"""Hex characters kept of a token batch's SHA-256."""


def token_digest(tokens: Int[Tensor, "batch pos"]) -> str:
    """The SHA-256 of the token ids (as int64, row-major), first :data:`DIGEST_CHARS` hex characters.

    Example:
        >>> import torch
        >>> token_digest(torch.tensor([[0, 1, 2]])) == token_digest(torch.tensor([[0, 1, 2]], dtype=torch.int32))
        True
    """
    data = tokens.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]


@dataclass(frozen=True)
class TokenBatch:
    """Token ids with their corpus and seed.

    Attributes:
        tokens: ``[batch, pos]`` token ids, BOS first.
        corpus: the corpus as given (a bundled name, a file or folder path, ``"iterable"``, a
            dataset name), or ``None`` when unknown.
        seed: the seed that drew the windows, or ``None`` when unknown.
        corpus_sha256: the digest of the corpus text, for files and folders (a path names a
            corpus, its digest says which text it held).

    Example:
        >>> import torch
        >>> b = TokenBatch(torch.tensor([[0, 1, 2], [0, 3, 4]]), corpus="austen", seed=0)
        >>> b[:1].tokens.tolist(), b[:1].corpus, b.describe()["n_tokens"]
        ([[0, 1, 2]], 'austen', 6)
    """

    tokens: Int[Tensor, "batch pos"]
    corpus: str | None = None
    seed: int | None = None
    corpus_sha256: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, Tensor):
            raise TypeError(f"TokenBatch.tokens must be a torch.Tensor, got {type(self.tokens).__name__}")

    def __getitem__(self, rows: slice) -> TokenBatch:
        """The batch's rows ``rows``, keeping corpus and seed."""
        if not isinstance(rows, slice):
            raise TypeError(f"index a TokenBatch with a slice of rows, got {type(rows).__name__}")
        return TokenBatch(self.tokens[rows], self.corpus, self.seed, self.corpus_sha256)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def shape(self) -> torch.Size:
        """The shape of the token ids."""
        return self.tokens.shape

    def describe(self) -> dict[str, Any]:
        """The batch's provenance record: corpus, seed, shape and digest."""
        return describe_tokens(self.tokens, self.corpus, self.seed, self.corpus_sha256)


def describe_tokens(
    tokens: Int[Tensor, "batch pos"], corpus: str | None = None, seed: int | None = None,
    corpus_sha256: str | None = None,
) -> dict[str, Any]:
    """The provenance record of a token batch (corpus and seed ``None`` where not known).

    Example:
        >>> import torch
        >>> r = describe_tokens(torch.tensor([[0, 1, 2]]), corpus="austen", seed=1)
        >>> r["corpus"], r["seed"], r["n_tokens"], len(r["sha256"])
        ('austen', 1, 3, 24)
    """
    record: dict[str, Any] = {
        "corpus": corpus,
        "seed": seed,
        "n_sequences": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        "n_tokens": int(tokens.numel()),
        "sha256": token_digest(tokens),
    }
    if corpus_sha256 is not None:
        record["corpus_sha256"] = corpus_sha256
    return record


def tensor_of(tokens: TokenBatch | Tensor) -> Tensor:
    """The token ids of a :class:`TokenBatch`, or ``tokens`` itself.

    Example:
        >>> import torch
        >>> t = torch.tensor([[0, 1]])
        >>> tensor_of(TokenBatch(t)) is t, tensor_of(t) is t
        (True, True)
    """
    return tokens.tokens if isinstance(tokens, TokenBatch) else tokens


def describe_any(tokens: TokenBatch | Tensor) -> dict[str, Any]:
    """The provenance record of a :class:`TokenBatch` or of a plain tensor (corpus unknown).

    Example:
        >>> import torch
        >>> describe_any(torch.tensor([[0, 1]]))["corpus"] is None
        True
    """
    return tokens.describe() if isinstance(tokens, TokenBatch) else describe_tokens(tokens)


Tokens = Int[Tensor, "batch pos"] | TokenBatch
"""What every analysis takes as its tokens: a ``[batch, pos]`` tensor or a :class:`TokenBatch`."""
