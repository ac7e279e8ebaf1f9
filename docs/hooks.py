"""MkDocs hooks of this site (not a page): read Google-style ``Example:`` sections as examples.

The package's docstrings title their runnable examples ``Example:`` (singular); griffe knows only
``Examples:`` as a code section and would render the singular as prose, so ``>>>`` lines would be
parsed as Markdown. Registering the singular title fixes that for every docstring.
"""

from __future__ import annotations

from typing import Any


def on_startup(**kwargs: Any) -> None:
    """Teach griffe's Google parser the singular section title ``Example``."""
    try:
        from griffe._internal.docstrings import google
        from griffe._internal.enumerations import DocstringSectionKind
    except ImportError:  # older griffe layout
        from griffe.docstrings import google  # type: ignore[no-redef]
        from griffe.enumerations import DocstringSectionKind  # type: ignore[no-redef]
    google._section_kind.setdefault("example", DocstringSectionKind.examples)
