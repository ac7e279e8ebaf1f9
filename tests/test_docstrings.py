"""Every docstring example in the package runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import stages_of_inference

SKIP = {"stages_of_inference.cli", "stages_of_inference.report", "stages_of_inference.study.run"}  # examples there run a whole study


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
