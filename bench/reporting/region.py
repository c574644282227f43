"""The region-attribution page: do disjoint regions of one generated digit get different influencers?"""

from __future__ import annotations

from bench.reporting.core import commands, load, page, para, source_links, table

REGION = "region_overlap.json"


@page(
    "docs/benchmarks/region_overlap.md",
    "Region attribution on the shipped model",
    "overlap of the top-k lists of two disjoint halves of a generated digit and of the whole image",
    REGION,
)
def region_overlap() -> str:
    results = load(REGION)
    intro = para(f"""
        Region attribution (`python -m explorer attribute --region X0,Y0,X1,Y1`, `Explorer.reattribute(...,
        region=box)`) attributes the output function over a box of the image instead of the whole image; the
        training features are unchanged. `bench/region_overlap.py` generates {results["digits"]} digits with
        the shipped model and compares, at several sampler steps, the top-{results["top_k"]} positive lists of
        the whole image (W) and of two disjoint halves (A, B) by their overlap |X & Y| / k. Region lists
        that mean something should overlap each other less than each overlaps the whole image's.""")
    rows = []
    held = total = 0
    for split, per_step in results["splits"].items():
        for step, cell in per_step.items():
            holds = cell["a_b"] < min(cell["whole_a"], cell["whole_b"])
            held, total = held + holds, total + 1
            rows.append(
                [
                    split,
                    step,
                    f"{cell['a_b']:.3f}",
                    f"{cell['whole_a']:.3f}",
                    f"{cell['whole_b']:.3f}",
                    "yes" if holds else "no",
                ]
            )
    verdict = para(f"""
        The ordering holds in {held} of {total} cells. The region lists share almost nothing with the whole
        image's at any step, so on this model region lists are a weak signal; why a half-image output's
        gradient aligns so little with the whole-image training features is not established yet.""")
    return "\n\n".join(
        [
            intro,
            commands(results["command"]),
            f"Results ({source_links([REGION])}):",
            table(["halves", "step", "A & B", "W & A", "W & B", "A & B below both"], rows),
            verdict,
        ]
    )
