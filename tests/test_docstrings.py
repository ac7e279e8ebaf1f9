"""Every docstring example in the package runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import stages_of_inference

SKIP = {"stages_of_inference.cli"}  # examples there run a whole study


def _modules() -> list[str]:
    names = ["stages_of_inference"]
    for info in pkgutil.walk_packages(stages_of_inference.__path__, "stages_of_inference."):
        if info.name not in SKIP:
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


@pytest.mark.parametrize("name", [n for n in _modules() if not n.rsplit(".", 1)[-1].startswith("_")])
def test_public_modules_declare_their_names(name: str) -> None:
    """Every public module says what it exports (``__all__``), and every name it lists exists."""
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), (list, tuple)), f"{name} has no __all__"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists names it does not define: {missing}"
