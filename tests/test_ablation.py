"""The recipe ablation's protocol on a small real set: jobs per recipe x fold on the folds of
the cross-validation benchmark, paired differences to the baseline, resuming, sharding."""
import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains models or starts clusters: minutes


@pytest.fixture(scope="module")
def recipes():
    from patchflannel import ablation

    return ablation


@pytest.mark.slow
def test_two_recipes_on_one_fold_in_two_shards(recipes, packs, tmp_path):
    chosen = [recipes.BASELINE, "style-balanced sampler (class, then source)",
              "unmasked patches (lung centres, no mask)", "lung box (masked film cropped to the lungs)"]
    argv = ["--packs", *map(str, packs), "--out", str(tmp_path), "--learner", "resnet18", "--patch-size", "96",
            "--image-roots", *(str(p.with_suffix("")) for p in packs), "--n-folds", "3",
            "--folds", "0", "--limit", "8", "--epochs", "1", "--test-limit", "6", "--k", "2", "--recipes", *chosen]
    for shard in ("0/2", "1/2"):
        recipes.main([*argv, "--shard", shard])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["recipes"]) == chosen
    base, styled = (summary["recipes"][r] for r in chosen[:2])
    assert base["folds"] == styled["folds"] == [0]
    job = json.loads((tmp_path / recipes.slug(chosen[1]) / "fold0" / "result.json").read_text())
    assert job["config"]["balance"] == "source" and job["n_test"] == 6
    assert styled["delta_vs_baseline_mean"] == pytest.approx(
        job["macro_f1"] - json.loads((tmp_path / recipes.slug(chosen[0]) / "fold0" / "result.json").read_text())[
            "macro_f1"])
    for recipe, input in zip(chosen[2:], ("patches_unmasked", "lung_box")):
        ablation = json.loads((tmp_path / recipes.slug(recipe) / "fold0" / "result.json").read_text())
        assert ablation["config"]["input"] == input and 0 <= ablation["macro_f1"] <= 1 and ablation["n_test"] == 6
    table = (tmp_path / "summary.md").read_text()
    assert table.count("\n") == 2 + 4 and "style-balanced" in table and "lung box" in table
    # Every test-fold Cohen film is scored, for the AUC pooled over folds.
    cohen = job["cohen"]
    assert len(cohen["labels"]) == len(cohen["probs"]) > 0
    assert np.allclose(np.sum(cohen["probs"], axis=1), 1, atol=1e-3)
    assert summary["recipes"][chosen[1]]["cohen_n_covid"] + summary["recipes"][chosen[1]]["cohen_n_noncovid"] == \
        len(cohen["labels"])
    result = tmp_path / recipes.slug(chosen[1]) / "fold0" / "result.json"
    bundle = tmp_path / recipes.slug(chosen[1]) / "fold0" / "run" / "bundle" / "model.safetensors"
    mtime, bundle_mtime = result.stat().st_mtime, bundle.stat().st_mtime
    recipes.main(argv)  # finished jobs are not rerun
    assert result.stat().st_mtime == mtime
    # A result from before the Cohen check gets it from its saved model, without training again.
    result.write_text(json.dumps({k: v for k, v in job.items() if k != "cohen"}))
    recipes.main(argv)
    assert json.loads(result.read_text())["cohen"] == cohen and bundle.stat().st_mtime == bundle_mtime
