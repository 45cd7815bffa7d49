"""Every Python example of the README and docs/ runs, as written, on real films (K lowered for speed).

The examples name files (``chest.dcm``, ``a.png``, a masked ``.npz``...): the test makes them
from real cxr4 films in a fresh folder and runs each block there, so the examples also hold
outside the repository."""
import re
import shutil

import cv2
import numpy as np
import pytest

from .conftest import REPO
from .test_io import _dicom

BLOCKS = [block for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
          for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]
# Needs a Ray cluster and a job list made by an earlier command; its parts are Ray's own API.
NOT_RUN = {"ray.remote": "starts a Ray cluster for the cross-validation jobs"}
SMALL_K = 4


@pytest.fixture(scope="module")
def example_folder(tmp_path_factory, cxr4_rows, segmenter):
    """The files the examples name, made from real films."""
    from patchflannel.io import load_image
    from patchflannel.store import write_masked_npz

    root = tmp_path_factory.mktemp("readme")
    films = [r["image"] for r in cxr4_rows if r["label"] == "normal"][:3]
    grey = cv2.imread(films[0], cv2.IMREAD_GRAYSCALE)
    _dicom(root / "chest.dcm", grey.astype(np.uint16) * 16)
    shutil.copyfile(films[0], root / "chest.png")
    for name, film in zip(("a.png", "b.jpg", "c.png"), films):
        cv2.imwrite(str(root / name), cv2.imread(film, cv2.IMREAD_GRAYSCALE))
    image = load_image(films[1])
    result = segmenter.segment(image, original_mask=False)
    npz = root / "masked" / "cxr4" / "images" / "covid" / "x.jpg.npz"
    write_masked_npz(npz, working_image=result.working_image, working_mask=result.working_mask,
                     orig_shape=image.shape, content_box=result.letterbox.content_box, scale=result.letterbox.scale,
                     segmenter=segmenter.id, preprocess=segmenter.preprocess.to_dict(), source=films[1])
    return root


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, example_folder, monkeypatch):
    block = BLOCKS[index]
    for marker, why in NOT_RUN.items():
        if marker in block:
            pytest.skip(f"README example {index} {why}")
    from patchflannel import Pipeline
    from patchflannel.learners import PatchEngine

    pretrained, engine_init = Pipeline.from_pretrained.__func__, PatchEngine.__init__
    monkeypatch.setattr(Pipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: pretrained(cls, *a, **{**kw, "k": SMALL_K})))
    monkeypatch.setattr(PatchEngine, "__init__", lambda self, *a, **kw: engine_init(self, *a, **{**kw, "k": SMALL_K}))
    monkeypatch.chdir(example_folder)  # not the repository: shipped bundles must resolve from anywhere
    namespace: dict = {}
    exec(compile(block, f"README.md example {index}", "exec"), namespace)  # noqa: S102 - our own README
    if "pred" in namespace and hasattr(namespace["pred"], "ok"):
        assert namespace["pred"].ok, namespace["pred"].rejection


def test_readme_results_are_generated_from_the_benchmark_json():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "readme_results.py"), "--check"])
    assert proc.returncode == 0, "README.md or docs/ differ from benchmarks/results: run benchmarks/readme_results.py"


def test_every_results_block_names_a_renderer_and_existing_json():
    """Each generated block names a renderer of benchmarks/readme_results.py and every file that
    renderer reads exists: a renamed renderer or a moved JSON must not leave a block as last
    written, with numbers nothing checks any more."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_results", REPO / "benchmarks" / "readme_results.py")
    readme_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_results)

    problems, seen = [], 0
    for page in readme_results.PAGES:
        text = page.read_text()
        names = readme_results.block_names(text)
        unclosed = len(re.findall(r"<!-- results:\w+ -->", text)) - len(names)
        if unclosed:
            problems.append(f"{page.name}: {unclosed} results marker(s) without a matching end marker")
        for name in names:
            seen += 1
            if name not in readme_results.RENDERERS:
                problems.append(f"{page.name}: block {name!r} has no renderer")
                continue
            _, files, bundles = readme_results.RENDERERS[name]
            if not files and not bundles:
                problems.append(f"{page.name}: block {name!r} reads no JSON")
            problems += [f"{page.name}: block {name!r} reads {path.relative_to(REPO)}, which is missing"
                         for path in readme_results.sources(name) if not path.exists()]
    assert seen, "no generated results blocks found in README.md or docs/"
    assert not problems, "\n".join(problems)
