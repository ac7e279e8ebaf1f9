"""Reading results: the table inside a result object, its recorded model, a column check.
Shared by the analyses that read other analyses' tables and by the plots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd


def _provenance(result: Any) -> dict[str, Any]:
    if isinstance(result, pd.DataFrame):
        return dict(result.attrs.get("provenance", {}) or {})
    prov = getattr(result, "provenance", None)
    if isinstance(prov, Mapping):
        return dict(prov)
    heads = getattr(result, "heads", None)
    if isinstance(heads, pd.DataFrame):
        return dict(heads.attrs.get("provenance", {}) or {})
    return {}


def result_model(result: Any, default: str = "model") -> str:
    """The model name recorded in a result's provenance, else ``default``.

    Works on DataFrames (``attrs["provenance"]``), :class:`~stages_of_inference.results.Result`
    objects and :class:`~stages_of_inference.stages.detokenization.SubjoinerResult`.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"layer": [0]}); df.attrs["provenance"] = {"model": {"name": "gpt2"}}
        >>> result_model(df), result_model(pd.DataFrame())
        ('gpt2', 'model')
    """
    name = _provenance(result).get("model", {}).get("name")
    return str(name) if name else default


def n_layers_of(result: Any, table: pd.DataFrame | None = None) -> int | None:
    n = _provenance(result).get("model", {}).get("n_layers")
    if n:
        return int(n)
    if table is not None and "layer" in table and len(table):
        return int(pd.to_numeric(table["layer"], errors="coerce").max()) + 1
    return None


def table_of(result: Any, name: str | None = None) -> pd.DataFrame:
    """The DataFrame inside ``result`` (a DataFrame, a Result's table ``name`` or its only table)."""
    if isinstance(result, pd.DataFrame):
        return result
    tables = getattr(result, "tables", None)
    if isinstance(tables, Mapping):
        if name is not None and name in tables:
            return tables[name]
        if len(tables) == 1:
            return next(iter(tables.values()))
        raise ValueError(f"this result holds tables {sorted(tables)}; expected one named {name!r}")
    heads = getattr(result, "heads", None)
    if isinstance(heads, pd.DataFrame):
        return heads
    raise TypeError(f"expected a pandas DataFrame or a stages_of_inference result, got {type(result).__name__}")


def require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs the columns {missing}; this table has {list(df.columns)}")
