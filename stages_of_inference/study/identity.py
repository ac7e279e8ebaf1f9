"""What a study's numbers depend on: a model's identity, its token batches, each analysis'
fingerprint, and the one provenance record every stored result carries.

A finished analysis (or a task's result) is reused only when its recorded fingerprint equals the
one this run computes: the model's name in the study, its config and weights hashes, the digest
and shape of the token batch the analysis reads, the corpus and the analysis' own settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from stages_of_inference.backends import backend_of
from stages_of_inference.batch import TokenBatch, token_digest
from stages_of_inference.data import load_token_batch
from stages_of_inference.results import config_hash, weights_hash
from stages_of_inference.study.config import StudyConfig
from stages_of_inference.study.registry import Analysis, Tables

__all__ = ["ModelIdentity", "batch_identity", "fingerprint", "identity_of", "model_identity", "study_batches",
           "study_record", "tables_record"]


def study_batches(model: Any, config: StudyConfig) -> dict[str, TokenBatch]:
    """A model's token batches in the study: ``"main"`` (``config.n_sequences`` of the corpus,
    drawn by the seed) and ``"heavy"``, its first ``config.heavy_sequences``.
    """
    tokens = load_token_batch(model, config.corpus, n_sequences=config.n_sequences, seq_len=config.seq_len,
                              seed=config.seed)
    return {"main": tokens, "heavy": tokens[: config.heavy_sequences]}


def batch_identity(batch: TokenBatch) -> dict[str, Any]:
    """What a fingerprint records of a token batch: its seed, digest and shape.

    Example:
        >>> import torch
        >>> sorted(batch_identity(TokenBatch(torch.tensor([[0, 1, 2]]), corpus="default", seed=3)))
        ['seed', 'tokens_sha256', 'tokens_shape']
    """
    return {"seed": batch.seed, "tokens_sha256": token_digest(batch.tokens), "tokens_shape": list(batch.shape)}


def model_identity(name: str, model: Any) -> dict[str, Any]:
    """What a fingerprint records of a model: the name it has in the study, its config and
    weights hashes.
    """
    return {"model": str(name), "model_config_hash": config_hash(model), "model_weights_hash": weights_hash(model)}


@dataclass(frozen=True)
class ModelIdentity:
    """One model of a study as its results are addressed: its identity (:func:`model_identity`),
    its batches' identities (:func:`batch_identity`) and descriptions, its backend and blocks.
    Plain data: it crosses to a Ray driver and into shard records as JSON.

    Example:
        >>> m = ModelIdentity({"model": "m"}, {"main": {"seed": 0}}, {"main": {}}, "hooked", 4)
        >>> ModelIdentity.from_dict(json.loads(json.dumps(m.to_dict()))) == m
        True
    """

    model: dict[str, Any]
    batches: dict[str, dict[str, Any]]
    batch_records: dict[str, dict[str, Any]]
    backend: str
    n_layers: int

    def to_dict(self) -> dict[str, Any]:
        """The identity as JSON-ready data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ModelIdentity:
        """An identity from :meth:`to_dict` (a ``ValueError`` naming what is wrong otherwise)."""
        fields = {"model": dict, "batches": dict, "batch_records": dict, "backend": str, "n_layers": int}
        if not isinstance(data, dict) or any(not isinstance(data.get(k), t) for k, t in fields.items()):
            raise ValueError("a model identity must have " + ", ".join(f"{k} ({t.__name__})" for k, t in fields.items()))
        return cls(**{k: data[k] for k in fields})

    def differs(self, other: ModelIdentity) -> str | None:
        """``None`` when ``other`` is the same model with the same batches; else which value
        differs and its two values, in words.

        Example:
            >>> a = ModelIdentity({"model": "m", "model_weights_hash": "1"}, {}, {}, "hooked", 4)
            >>> a.differs(ModelIdentity({"model": "m", "model_weights_hash": "2"}, {}, {}, "hooked", 4))
            'model_weights_hash 1 against 2'
        """
        for key in sorted(set(self.model) | set(other.model)):
            if self.model.get(key) != other.model.get(key):
                return f"{key} {self.model.get(key)} against {other.model.get(key)}"
        for kind in sorted(set(self.batches) | set(other.batches)):
            mine, theirs = self.batches.get(kind, {}), other.batches.get(kind, {})
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    return f"{kind} batch {key} {mine.get(key)} against {theirs.get(key)}"
        if self.backend != other.backend:
            return f"backend {self.backend} against {other.backend}"
        return None


def identity_of(name: str, model: Any, batches: dict[str, TokenBatch]) -> ModelIdentity:
    """The :class:`ModelIdentity` of a loaded model and its study batches."""
    return ModelIdentity(model_identity(name, model), {k: batch_identity(b) for k, b in batches.items()},
                         {k: b.describe() for k, b in batches.items()}, backend_of(model), int(model.cfg.n_layers))


def fingerprint(analysis: Analysis, config: StudyConfig, identity: ModelIdentity) -> dict[str, Any]:
    """What a finished analysis' numbers depend on: the model, the corpus, the token batch it
    read (digest and shape) and its registry settings. A result is reused only when it matches.

    Example:
        >>> from stages_of_inference.study.registry import REGISTRY
        >>> who = ModelIdentity({"model": "m"}, {"main": {"seed": 0}}, {}, "hooked", 4)
        >>> sorted(fingerprint(REGISTRY["neurons"], StudyConfig(), who))
        ['analysis', 'corpus', 'model', 'settings']
    """
    data: dict[str, Any] = {"corpus": config.corpus}
    if analysis.tokens != "none":
        data.update(identity.batches[analysis.tokens])
    return json.loads(json.dumps({"analysis": analysis.name, **identity.model, **data,
                                  "settings": analysis.settings(config)}, default=str))


def tables_record(tables: Tables) -> dict[str, Any]:
    """The provenance the analysis' own function gave its tables (the first table's)."""
    return dict(next(iter(tables.values())).attrs.get("provenance", {})) if tables else {}


def study_record(tables: Tables, name: str, fp: dict[str, Any], identity: ModelIdentity,
                 analysis: Analysis, **more: Any) -> dict[str, Any]:
    """The provenance record of a stored result of the study (a task's, or a finished
    analysis'): the analysis' own record, the model's name in the study, the token batch it read
    (``tokens``: corpus, seed, shape, digest), its study fingerprint, and ``more`` (``task``
    for a task; ``study`` and ``study_seconds`` for a finished analysis).
    """
    record = tables_record(tables)
    record["model"] = {**record.get("model", {}), "name": name}
    if analysis.tokens != "none":
        record["tokens"] = identity.batch_records[analysis.tokens]
    record["study_fingerprint"] = fp
    record.update(more)
    return record
