"""Every example in the package's docstrings runs and shows what it says (``# doctest: +SKIP``
marks those that need files)."""
import doctest
import importlib
import pkgutil

import pytest

import patchflannel

MODULES = sorted(m.name for m in pkgutil.walk_packages(patchflannel.__path__, "patchflannel.")
                 if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
