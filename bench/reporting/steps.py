"""Per-step pages (issue 19): per-step quality of the served indexes, the per-step candidates, LDS on the
shipped model, and the served index against exact scores."""

from __future__ import annotations

import math

from bench.reporting import core
from bench.reporting.core import commands, load, page, para, source_links, strip_lock, table
from bench.reporting.truth import ceiling_rows

QUALITY = "step_quality.json"
CANDIDATES = "step_candidates.json"
SHIPPED_LDS = "lds_mnist5k.json"
SERVED = "served_vs_exact.json"

SHIPPED_INDEX = "assets/index"
SHIPPED_STEPS = 2500  # the shipped model's recipe (assets/model/training.json)
# what the index directories that the step-quality result names are, beyond their labels
INDEX_NOTES = {
    SHIPPED_INDEX: "the shipped index",
    "runs/mean512": "the previous shipped setting (not centered), rebuilt",
}


def by_timestep(per_bucket: dict) -> list[str]:
    """The timestep keys of a per-bucket result, in increasing order."""
    return sorted(per_bucket, key=int)


def number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def lds_cell(entry: dict) -> str:
    """'mean [lo, hi]' of an LDS entry, n/a for what is not measured (NaN)."""
    low, high = entry["ci95"]
    if math.isnan(entry["mean"]):
        return "n/a"
    if math.isnan(low) or math.isnan(high):
        return f"{entry['mean']:.3f} [n/a]"
    return f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}]"


def index_name(directory: str, label: str) -> str:
    note = INDEX_NOTES.get(directory)
    return f"`{directory}`: {note} ({label})" if note else f"`{directory}` ({label})"


QUALITY_ROWS = (
    ("top-10 label agreement", "label_agreement", "{:.3f}"),
    ("min spread of the top-10 scores", "spread_min", "{:.3f}"),
    ("share of queries with a positive-scored negative", "positive_negative_share", "{:.1%}"),
)


def quality_table(per_bucket: dict, split: str) -> str:
    steps = by_timestep(per_bucket)
    rows = [
        [name, *(fmt.format(per_bucket[t][split][key]) for t in steps)] for name, key, fmt in QUALITY_ROWS
    ]
    return table(["test split", *(f"t = {t}" for t in steps)], rows)


@page(
    "docs/benchmarks/step_quality.md",
    "Per-step quality on held-out digits",
    "top-10 label agreement, score spread and positive-scored negatives of the served indexes at every "
    "bucket's timestep",
    QUALITY,
)
def step_quality() -> str:
    results = load(QUALITY)
    indexes = results["indexes"]
    intro = para("""
        Do the served attributions stay sound over the whole slider, without retraining anything? `precompute
        evaluate step-quality` queries each index with the held-out mnist5k digits at every bucket's timestep
        (what the explorer does for a step of that bucket) and measures, from every training image's score:
        the top-10 label agreement (the share of the ten strongest positive influencers with the query's
        label; chance is about 0.1), the spread (max - min) / max of the ten top positive scores (near 0, the
        top list is a tie set by rounding), and the share of queries whose ten "negative" influencers (the
        lowest scores) include a positive score. The held-out digits are split in two halves by a seed:
        settings are chosen on the dev half (`bench/step_candidates.py`), and the tables below are the test
        half, 250 digits. Each index is read through its own files, as the explorer serves it.""")
    parts = [intro, commands(strip_lock(results["command"])), f"Results ({source_links([QUALITY])}):"]
    for directory, entry in indexes.items():
        storage = "" if entry["storage"] in entry["label"] else f", {entry['storage']} storage"
        parts += [
            f"## {index_name(directory, entry['label'])}{storage}",
            quality_table(entry["per_bucket"], "test"),
        ]
    shipped = SHIPPED_INDEX if SHIPPED_INDEX in indexes else next(iter(indexes))
    per_bucket = indexes[shipped]["per_bucket"]
    steps = by_timestep(per_bucket)
    parts += [
        f"## All 500 held-out digits, `{shipped}`",
        para("""The top-10 label agreement of the same index over both halves (dev and test
                  together):"""),
        table(
            ["all held-out digits", *(f"t = {t}" for t in steps)],
            [["top-10 label agreement", *(f"{per_bucket[t]['all']['label_agreement']:.3f}" for t in steps)]],
        ),
    ]
    return "\n\n".join(parts)


def candidate_order(name: str) -> tuple:
    output, centering, lam = name.split("|")
    return output, centering, float(lam)


def choice_order(name: str) -> tuple:
    return tuple(name.split("|"))


def candidate_label(name: str) -> str:
    output, centering, lam = name.split("|")
    return f"{output}, {centering}, lambda {float(lam):g}"


@page(
    "docs/benchmarks/step_candidates.md",
    "Per-step candidates (issue 19)",
    "top-10 label agreement per bucket of every output function, centering and relative lambda, chosen on "
    "the dev half of the held-out digits",
    CANDIDATES,
)
def step_candidates() -> str:
    results = load(CANDIDATES)
    candidates, choices, queries = results["candidates"], results["dev_choice"], results["queries"]
    steps = by_timestep(next(iter(candidates.values())))
    columns = [f"t = {t}" for t in steps]
    intro = para(f"""
        Which index settings keep per-step attributions sound over the whole slider?
        `bench/step_candidates.py` scores every candidate (output function x centering x relative lambda
        {", ".join(f"{lam:g}" for lam in results["lambdas"])}) bucket by bucket from the raw features an
        index build kept (`precompute featurize --keep-features`), through explorer.scoring, the path the
        index build uses, with the held-out mnist5k digits as queries at each bucket's timestep (the measures
        of the [per-step quality](step_quality.md) page). The dev half ({queries["dev"]} digits) chooses;
        the test half ({queries["test"]} digits) is read only for the choices.""")
    dev_rows = []
    for name in sorted(candidates, key=candidate_order):
        values = [candidates[name][t]["dev"]["label_agreement"] for t in steps]
        worst = min(range(len(steps)), key=values.__getitem__)
        dev_rows.append(
            [
                candidate_label(name),
                *(f"{v:.3f}" for v in values),
                f"{values[worst]:.3f} (t = {steps[worst]})",
            ]
        )
    one_rows, per_bucket_rows = [], []
    for name in sorted(choices, key=choice_order):
        output, centering = name.split("|")
        one, per_bucket = choices[name]["one_lambda"], choices[name]["lambda_per_bucket"]
        spread = min(one["test"][t]["spread_min"] for t in steps)
        one_rows.append(
            [
                output,
                centering,
                f"{one['lambda']:g}",
                f"{one['dev_mean']:.3f}",
                *(f"{one['test'][t]['label_agreement']:.3f}" for t in steps),
                f"{spread:.3f}",
            ]
        )
        per_bucket_rows.append(
            [
                output,
                centering,
                *(
                    f"{per_bucket[t]['test']['label_agreement']:.3f} ({per_bucket[t]['lambda']:g})"
                    for t in steps
                ),
            ]
        )
    return "\n\n".join(
        [
            intro,
            commands(strip_lock(results["command"])),
            f"Results ({source_links([CANDIDATES])}):",
            "## Dev half: top-10 label agreement per bucket",
            table(["candidate (output, centering, relative lambda)", *columns, "worst bucket"], dev_rows),
            "## Test half: the dev choices",
            para("""One relative lambda per output function and centering, the one with the best mean
            dev label
            agreement over the buckets: its test label agreement per bucket, and the lowest min spread of the
            top-10 scores over the buckets."""),
            table(["output", "centering", "lambda (dev)", "dev mean", *columns, "min spread"], one_rows),
            para("""With a lambda chosen on dev for each bucket instead: test label agreement (lambda in
            brackets)."""),
            table(["output", "centering", *columns], per_bucket_rows),
        ]
    )


LDS_COLUMNS = (
    ("held-out digits", "heldout"),
    ("generated images", "generated"),
    ("per-step (trajectory-tied)", "step_trajectory"),
    ("per-step proxy", "step_proxy"),
)


def method_name(name: str, label: str) -> str:
    return label if label.endswith("baseline") else index_name(name, label)


def planned_models() -> int | None:
    config = core.RESULTS / "lds_mnist5k" / "config.json"
    return load("lds_mnist5k/config.json")["truth"]["subsets"] if config.exists() else None


@page(
    "docs/benchmarks/lds_mnist5k.md",
    "LDS on the shipped model",
    "linear datamodeling score of the served index and the baselines on mnist5k, whole images and per "
    "step, against subset models of the shipped architecture",
    SHIPPED_LDS,
)
def lds_mnist5k() -> str:
    results = load(SHIPPED_LDS)
    truth, methods = results["truth"], results["methods"]
    planned = planned_models()
    first = next(iter(methods.values()))["test"]
    heldout_queries, generated_queries = first["heldout"]["queries"], first["generated"]["queries"]
    intro = para(f"""
        How well do the served scores predict what training data does to the shipped model itself?
        `precompute evaluate shipped-lds` scores each index directory through its own files (what the explorer
        serves is what is measured) against subset models of the shipped architecture, retrained on random
        halves of the 4,500 mnist5k training images with a {truth["recipe_steps"]}-step recipe
        ({truth["recipe_steps"] / SHIPPED_STEPS:.2f}x the shipped {SHIPPED_STEPS:,}). The ground truth is in
        [`bench/results/lds_mnist5k/`](../../bench/results/lds_mnist5k/), one file per model. Whole-image
        columns: held-out digits ({heldout_queries} test queries) and generated images ({generated_queries}),
        a training image's score summed over the buckets, each bucket queried at its own timestep. Per-step
        columns: the query the explorer builds at a sampler step (x0hat in the step's bucket), against the
        subset model's loss at the trajectory's own x_t (trajectory-tied), and against the older proxy
        (x0hat re-noised). LDS is the Spearman correlation over subset models of the true loss with the loss
        the scores predict, averaged over queries; test split only (odd subset models, test queries), with a
        95% bootstrap over models and queries together. The seed ceiling row is the same statistic between
        the two replicates of the subsets retrained with a second seed: two replicates of a noisy truth
        correlate at about the square of what a perfect predictor reaches against one of them, so its square
        root is the LDS that seed noise leaves; with few repeated subsets its interval is wide (see
        [seed noise](#seed-noise)).""")
    if planned and truth["models"] >= planned:
        models = para(f"""These numbers use all {truth["models"]} subset models, {truth["test_models"]} of
            them in the test split ({truth["dev_models"]} dev).""")
    else:
        of_planned = f" of the {planned} planned" if planned else ""
        models = para(f"""
            These numbers use {truth["models"]}{of_planned} subset models, {truth["test_models"]} of them in
            the test split ({truth["dev_models"]} dev): the run is partial while models are still being
            retrained, and this page is rewritten as they are added.""")
    rows = [
        [method_name(name, entry["label"]), *(lds_cell(entry["test"][key]) for _, key in LDS_COLUMNS)]
        for name, entry in methods.items()
    ]
    rows += ceiling_rows(results, LDS_COLUMNS, lds_cell)
    buckets = len(first["heldout_by_bucket"])
    width = 1000 // buckets  # the shipped scheduler's 1,000 training timesteps in equal buckets
    by_bucket = table(
        ["method", *(f"t = {b * width + width // 2}" for b in range(buckets))],
        [
            [
                method_name(name, entry["label"]),
                *(number(cell["mean"]) for cell in entry["test"]["heldout_by_bucket"]),
            ]
            for name, entry in methods.items()
        ],
    )
    step_rows = [f"step {s} (t ~ {t})" for s, t in zip(truth["steps"], truth["step_timesteps"], strict=True)]
    by_step = table(
        ["sampler step", *(method_name(name, entry["label"]) for name, entry in methods.items())],
        [
            [label, *(lds_cell(entry["test"]["step_trajectory_by_step"][j]) for entry in methods.values())]
            for j, label in enumerate(step_rows)
        ],
    )
    return "\n\n".join(
        [
            intro,
            models,
            commands(strip_lock(results["command"])),
            f"Results, test split, mean [95% interval] ({source_links([SHIPPED_LDS])}):",
            table(["method", *(name for name, _ in LDS_COLUMNS)], rows),
            "## Held-out digits by bucket",
            para("""Mean LDS of the held-out test digits bucket by bucket: the score in the bucket
            (queried at its
            timestep, the bucket's centre) against the loss measured inside the bucket."""),
            by_bucket,
            "## Per-step queries by sampler step",
            para("""The per-step curve: trajectory-tied LDS of the per-step test queries at each sampler step
            (t: the mean timestep of the step over the trajectories), mean [95% interval], the bootstrap over
            models and trajectories."""),
            by_step,
            *seed_noise(methods, results.get("seed_ceiling", {}).get("subsets", 0)),
        ]
    )


def seed_noise(methods: dict, twice: int) -> list[str]:
    """The held-out LDS of each method on the twice-trained subsets, against either seed and their mean."""
    rows = [
        [
            method_name(name, entry["label"]),
            *(lds_cell(cells[key]) for key in ("seed0", "seed1", "two_seed_mean")),
        ]
        for name, entry in methods.items()
        if (cells := entry.get("repeated_subsets"))
    ]
    if not rows:
        return []
    return [
        "## Seed noise",
        para(f"""Held-out LDS (all 500 held-out digits) on the {twice} subsets trained with two seeds only,
            dev and test together: against the first seed's truth, the second's, and their mean. A method
            that predicts the two-seed mean better than either seed is limited by the truth's seed noise,
            not only by its own error."""),
        table(["method", "against seed 0", "against seed 1", "against the two-seed mean"], rows),
    ]


@page(
    "docs/benchmarks/served_vs_exact.md",
    "Served index against exact scores",
    "top-10 overlap of the served index's lists with exact float32 scores at the query's own timestep",
    SERVED,
)
def served_vs_exact() -> str:
    results = load(SERVED)
    per_timestep = results["per_timestep"]
    intro = para(f"""
        How far is what the explorer serves from exact scores at the query's own timestep? The served index
        ({results["index"]}; {results["storage"]} storage) stores one timestep per bucket, its centre; a
        query at train timestep t is featurized at its bucket's timestep and searched in the stored rows.
        `bench/served_vs_exact.py` featurizes every training image and the query at t itself, with the
        index's own spec and scoring (explorer.scoring: centering, lambda, normalization), in float32, and
        gives per t the mean top-10 overlap of the two lists, positive and negative influencers, over
        {results["queries"]} held-out test-split digits. The {len(per_timestep)} query timesteps lie in
        {len({entry["bucket"] for entry in per_timestep.values()})} buckets, each off its bucket's centre
        (where the stored features were taken).""")
    rows = [
        [
            t,
            entry["bucket"],
            entry["bucket_timestep"],
            f"{entry['top10_overlap_positive']:.3f}",
            f"{entry['top10_overlap_negative']:.3f}",
            f"{entry['seconds']:.1f}",
        ]
        for t, entry in sorted(per_timestep.items(), key=lambda item: int(item[0]))
    ]
    return "\n\n".join(
        [
            intro,
            commands(strip_lock(results["command"])),
            f"Results ({source_links([SERVED])}):",
            table(
                [
                    "query t",
                    "bucket",
                    "bucket's timestep",
                    "top-10 overlap, positive",
                    "top-10 overlap, negative",
                    "seconds",
                ],
                rows,
            ),
        ]
    )
