"""The documentation site builds with ``mkdocs build --strict`` and can be read offline.

Strict mode turns every warning into a failure: a broken link between pages, a ``:::`` block
naming a module that does not exist, or a docstring the API reference cannot render."""
import os
import re
import subprocess
import sys

import pytest

from .conftest import REPO

# Assets a page would load from the network when opened: scripts, stylesheets, fonts, icons.
REMOTE_ASSET = re.compile(r"<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", re.I)


def test_docs_site_builds_strictly_and_offline(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e .[test] to build the docs")
    pytest.importorskip("material", reason="mkdocs-material is not installed: pip install -e .[test]")
    pytest.importorskip("mkdocstrings_handlers.python",
                        reason="mkdocstrings[python] is not installed: pip install -e .[test]")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(site)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # the theme's end-of-life notice: not a build warning
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr}"

    index = (site / "index.html").read_text(encoding="utf-8")
    assert "fonts.googleapis.com" not in index and "fonts.gstatic.com" not in index, "the site loads web fonts"
    remote = [m.group(0) for m in REMOTE_ASSET.finditer(index)]
    assert not remote, f"index.html loads assets from the network: {remote}"
