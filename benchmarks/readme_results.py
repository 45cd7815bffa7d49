"""Rewrite the generated result blocks of README.md and docs/*.md from benchmarks/results/.

    python benchmarks/readme_results.py          # rewrite them in place
    python benchmarks/readme_results.py --check  # exit 1 if one is out of date

A generated block sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``; its
text comes only from ``benchmarks/results/NAME.json`` through the renderer of that name below,
so no number in it is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def hostile_input(r: dict) -> str:
    rows = "\n".join(f"| {title} | `{s['file']}` | {s['cases']} | {s['passed']} |" for title, s in r["suites"].items())
    return (f"**{r['cases']} hostile test cases tried, {r['passed']} passed, {r['failed']} failed**:\n\n"
            "| entry points | cases built in | tried | passed |\n|---|---|---|---|\n" + rows +
            "\n\n`python benchmarks/hostile_input.py --out benchmarks/results/hostile_input.json`")


def centre_stability(r: dict) -> str:
    return (f"Segmenter in float32 against bf16 on {r['films']} real films (cxr4 and adult, every class): "
            f"{r['films_whose_mask_differs']} masks differ (median {r['mask_pixels_differ_median_where_changed']:.0f} "
            f"pixels); **{100 * r['centres_identical']:.1f} % of the K = {r['k']} patch centres are identical** "
            f"(goal 95 %; the earlier sampler, seeded by the masked film: "
            f"{100 * r['earlier_sampler_centres_identical']:.1f} %); through the whole pipeline "
            f"(K = {r['pipeline_k']}, {r['pipeline_compared']} films run both ways) "
            f"**{100 * r['labels_identical']:.1f} % identical labels** (goal 99 %), largest class-probability "
            f"difference {r['max_probability_difference']:.4f}.\n\n"
            f"`python benchmarks/centre_stability.py --data ../shared/data --n {r['films']} --k {r['k']}"
            + (f" --pipeline-k {r['pipeline_k']}" if r['pipeline_k'] != r['k'] else "")
            + " --out benchmarks/results/centre_stability.json`")


def memory(r: dict) -> str:
    lines = []
    if "explain" in r:
        e = r["explain"]
        lines.append(f"- `Pipeline.predict(film, explain=True)`, K = 100: **{_gb(e['batch_8']['added_bytes'])}** "
                     f"above the loaded pipeline with Grad-CAM over 8 patches per backward pass (default), "
                     f"{_gb(e['batch_32']['added_bytes'])} over 32 (the earlier setting); goal 2 GB.")
    if "huge_films" in r:
        h = r["huge_films"]
        lines.append(f"- Segment job over six all-zero 10000 x 9999 PNGs: **{_gb(h['bounded']['added_bytes'])}** with "
                     f"the bound of {h['bound_pixels'] / 1e6:.0f} M decoded pixels in flight, "
                     f"{_gb(h['unbounded']['added_bytes'])} without it.")
    if "prediction_list" in r:
        p = r["prediction_list"]
        lines.append(f"- {p['films']} predictions kept in a list hold {p['packed_mask_bytes'] / 1e6:.1f} MB of lung "
                     f"masks (bit-packed), against {p['unpacked_mask_bytes'] / 1e6:.1f} MB unpacked.")
    return "\n".join(lines) + "\n\n`python benchmarks/memory.py --data ../shared/data --out benchmarks/results/memory.json`"


def test_suite(r: dict) -> str:
    w, f = r["whole"], r["fast"]
    return (f"On this {r['cpus']}-core CPU the whole suite (`make test`) took **{w['seconds'] / 60:.1f} min** "
            f"({w.get('passed', 0)} passed, {w.get('failed', 0)} failed, {w.get('skipped', 0)} skipped); "
            f"the fast subset `{f['command']}` {f['seconds'] / 60:.1f} min ({f.get('passed', 0)} passed).\n\n"
            "`python benchmarks/test_suite.py --out benchmarks/results/test_suite.json`")


RENDERERS = {"hostile_input": hostile_input, "centre_stability": centre_stability, "memory": memory,
             "test_suite": test_suite}


def render(readme: str) -> str:
    def block(match: re.Match) -> str:
        name = match.group(1)
        if not (RESULTS / f"{name}.json").is_file():
            return match.group(0)  # not measured yet: left as it is
        data = json.loads((RESULTS / f"{name}.json").read_text())
        return f"<!-- results:{name} -->\n{RENDERERS[name](data)}\n<!-- /results:{name} -->"

    return re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", block, readme, flags=re.S)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    stale = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    return int(bool(stale) and args.check)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
