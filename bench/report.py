"""Write the benchmark pages in docs/benchmarks/ (and docs/evaluation.md) from the results in bench/results/.

    python bench/report.py            # (re)write every page
    python bench/report.py --check    # write nothing; exit 1, naming the stale pages, if a page would change

Each page is one small builder function registered with @page: it reads its result files and returns the
page's markdown below the title (an intro saying what was measured and the command that wrote the result
file, then tables rendered from it). To add a page, add a builder, e.g.

    @page("docs/benchmarks/step_quality.md", "Per-step quality", "a line for the index", "step_quality.json")
    def step_quality() -> str:
        results = load("step_quality.json")
        return "\\n\\n".join([para("What ..."), commands(results["command"]), table(header, rows)])

and take its result file out of PENDING. The index page (docs/benchmarks/README.md) lists every builder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"

# Result files in bench/results whose pages are still to be written (tests/test_docs.py allows them).
PENDING = ("step_candidates.json", "step_quality.json", "served_vs_exact.json", "lds_mnist5k.json")


@dataclass(frozen=True)
class Page:
    path: str  # relative to the repository root
    title: str
    summary: str  # one line for the index page
    sources: tuple[str, ...]  # result files, relative to bench/results
    build: Callable[[], str]


PAGES: list[Page] = []


def page(path: str, title: str, summary: str, *sources: str):
    """Register a page builder; the builder returns the page's body (markdown below the title)."""

    def register(build: Callable[[], str]) -> Callable[[], str]:
        PAGES.append(Page(path, title, summary, sources, build))
        return build

    return register


# ------------------------------------------------------------------------------------------------------------
# helpers


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def para(text: str) -> str:
    """One paragraph from text wrapped in the source: whitespace runs become single spaces."""
    return " ".join(text.split())


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def commands(*lines: str) -> str:
    return "```bash\n" + "\n".join(lines) + "\n```"


def strip_lock(command: str) -> str:
    """Recorded commands ran under the CPU lock of the machine they ran on; the command itself follows it."""
    return command.removeprefix("flock /tmp/cpu.lock ")


def check_command(command: str, args: dict) -> str:
    """The command, once each of its --flag [value] matches the argparse namespace a result recorded."""
    words = command.split()
    for position, word in enumerate(words):
        if not word.startswith("--"):
            continue
        key = word[2:].replace("-", "_")
        if key not in args:
            raise ValueError(f"{command!r}: {word} is not among the recorded args")
        following = words[position + 1] if position + 1 < len(words) else "--"
        value = None if following.startswith("--") else following
        if (value is None and args[key] is not True) or (value is not None and str(args[key]) != value):
            raise ValueError(f"{command!r}: {word} {value or ''} but the result says {key} = {args[key]!r}")
    return command


def ratios(mine: list[float], theirs: list[float]) -> list[float]:
    return [a / b for a, b in zip(mine, theirs, strict=True)]


def joined(values, digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def rate(value: float) -> str:
    """Images/s or a ratio: two decimals, three significant digits below 1, none from 100 up."""
    return f"{value:.3g}" if value < 1 else f"{value:.0f}" if value >= 100 else f"{value:.2f}"


def rates(values) -> str:
    return ", ".join(map(rate, values))


def interval(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}]"


def source_links(names) -> str:
    return ", ".join(f"[`bench/results/{name}`](../../bench/results/{name})" for name in names)


# ------------------------------------------------------------------------------------------------------------
# featurization against traker

TRAKER = "featurize_vs_traker_mixed_bucket.json"
TRAKER_SEEDS = "featurize_vs_traker_mixed_bucket_seeds5-9.json"
TRAKER_COMMAND = (
    "python bench/featurize_vs_traker.py --projector kronecker --calibrate 16 --precision mixed "
    f"--traker-bf16 --seeds 5 --runs 7 --default-n 8 --workers-baseline 1 --json bench/results/{TRAKER}"
)
TRAKER_SEEDS_COMMAND = (
    "python bench/featurize_vs_traker.py --projector kronecker --calibrate 16 --precision mixed "
    f"--traker-bf16 --seeds 5 --first-seed 5 --runs 3 --skip-default --json bench/results/{TRAKER_SEEDS}"
)
FASTER_TRAKER = "traker best, the faster of fp32 and bf16 autocast in each repeat"


def traker_rows(results: dict) -> tuple[dict, dict]:
    """The rows by method name, and our main row."""
    rows = {row["method"]: row for row in results["rows"]}
    return rows, next(row for name, row in rows.items() if name.startswith("ours ("))


def speed_headline(results: dict | None = None) -> float:
    """The README's speed figure: ours over the faster of traker best's fp32 and bf16 arithmetic."""
    return (results or load(TRAKER))["ratios"][FASTER_TRAKER]


def spearman_cells(spearman: dict | None) -> list[str]:
    if spearman is None:
        return ["not measured"] * 4
    cells = []
    for kind in ("inner", "cosine"):
        entry = spearman[kind]
        cells += [f"{entry['mean']:.5f} [{joined(entry['per_seed'], 4)}]", f"{entry['min']:.4f}"]
    return cells


def traker_tables(results: dict) -> str:
    rows, ours = traker_rows(results)
    args = results["args"]
    speed = table(
        ["method", "settings", "setup s", f"images/s per repeat ({args['runs']} repeats)", "median images/s"],
        [[row["method"], row["settings"], f"{row['setup_s']:.1f}", rates(row["images_per_s"]),
          rate(row["median_images_per_s"])] for row in rows.values()],
    )
    first = args.get("first_seed", 0)
    agreement = table(
        ["method", f"Spearman, inner product: mean [per seed; seeds {first}-{first + args['seeds'] - 1}]",
         "worst query", "Spearman, cosine: mean [per seed]", "worst query"],
        [[row["method"], *spearman_cells(row["spearman"])] for row in rows.values()],
    )
    against = [[name, f"**{rate(results['ratios'][name])}x**",
                rates(ratios(ours["images_per_s"], row["images_per_s"]))]
               for name, row in rows.items() if row is not ours]
    if FASTER_TRAKER in results["ratios"]:
        best, bf16 = rows["traker best"]["images_per_s"], rows["traker best, bf16 autocast"]["images_per_s"]
        faster = [max(a, b) for a, b in zip(best, bf16, strict=True)]
        against.append([FASTER_TRAKER, f"**{rate(results['ratios'][FASTER_TRAKER])}x**",
                        rates(ratios(ours["images_per_s"], faster))])
    speedups = table([f"{ours['method']} against", "median of the within-repeat ratios",
                      "within-repeat ratios"], against)
    cost = results["cost_vs_training"]
    training = table(
        ["ours, ms per (example, timestep)", "AdamW training step, ms per sample (median)",
         "ours / training step", "within-repeat ratios"],
        [[f"{cost['ms_per_example_timestep']:.3f}", f"{cost['train_step_ms_per_sample']:.3f}",
          f"**{cost['relative_to_train_step']:.2f}x**", joined(cost["ratios"])]],
    )
    return "\n\n".join([
        speed, agreement, speedups,
        para(f"""Cost against training ({args['train_steps']} AdamW steps of the same model at batch
            {args['train_batch']}, fp32, as `precompute train` trains, timed in each repeat):"""),
        training,
    ])


@page("docs/benchmarks/featurize_speed.md", "Featurization speed: ours against traker",
      "images/s and agreement with exact scores of our featurizer against traker 0.3.2, and against a "
      "training step", TRAKER, TRAKER_SEEDS)
def featurize_speed() -> str:
    results, second = load(TRAKER), load(TRAKER_SEEDS)
    args = results["args"]
    cosines = {}
    for name in ("ours", "traker best"):
        rows = [traker_rows(r)[1] if name == "ours" else traker_rows(r)[0][name] for r in (results, second)]
        cosines[name] = statistics.fmean(rows[0]["spearman"]["cosine"]["per_seed"]
                                         + rows[1]["spearman"]["cosine"]["per_seed"])
    intro = para(f"""
        How fast does `precompute featurize` turn training images into projected gradients, against traker
        0.3.2 on the same CPU, and how close do both come to the exact scores? Both sides featurize the same
        {args['n']} mnist5k training images of the shipped model with the same quantity: the gradient of
        D-TRAK's `square` output averaged over 10 timesteps (t = 50, 150, ..., 950) with the same shared
        noise, projected to k = {args['proj_dim']} (traker's unprojected gradient matches ours to
        {results['gradient_mismatch']:.1e} relative). Ours runs `--projector {args['projector']} --calibrate
        {args['calibrate']} --precision {args['precision']}` on {args['workers']} worker threads; "traker
        best" is traker at its fastest settings (fp32, one projector block built once, {args['traker_batch']}
        images per call), also timed under the same bf16 autocast (`--traker-bf16`, not a traker setting).
        Timed runs are interleaved (each repeat times every method once) and a speed-up is the median of the
        within-repeat ratios. Agreement: for {args['queries']} held-out queries, the Spearman correlation of
        each method's scores for the training images with the exact scores from full unprojected gradients,
        averaged over projection seeds. traker is a bench-only dependency.""")
    second_intro = para(f"""
        The same bench with projection seeds 5-9 and {second['args']['runs']} more timed repeats, traker
        default left out ({source_links([TRAKER_SEEDS])}). Over all ten seeds the mean cosine agreement is
        {cosines['ours']:.5f} for ours and {cosines['traker best']:.5f} for traker best.""")
    return "\n\n".join([
        intro,
        commands("pip install -r bench/requirements-bench.txt", check_command(TRAKER_COMMAND, args)),
        f"Results ({source_links([TRAKER])}):",
        traker_tables(results),
        "## A second sample of projection seeds",
        second_intro,
        commands(check_command(TRAKER_SEEDS_COMMAND, second["args"])),
        traker_tables(second),
    ])


# ------------------------------------------------------------------------------------------------------------
# where featurization time goes

PROFILE = "featurize_profile_2048_calibrated_bf16.json"
PROFILE_COMMAND = ("python bench/featurize_profile.py --paths kronecker+calibrated kronecker+calibrated+bf16 "
                   f"--repeats 5 --json bench/results/{PROFILE}")


@page("docs/benchmarks/featurize_profile.md", "Where featurization time goes",
      "per-stage cost of the kronecker featurizer in fp32 and bf16, one (example, timestep) per row, "
      "against a training step", PROFILE)
def featurize_profile() -> str:
    results = load(PROFILE)
    paths, batch = results["paths"], results["batch"]
    names = list(paths)
    stages = list(paths[names[0]]["stages_ms_per_batch"])
    rows = [[stage, *(f"{paths[name]['stages_ms_per_batch'][stage] / batch:.2f} ms" for name in names)]
            for stage in stages]
    rows.append(["features end to end",
                 *(f"{paths[name]['features_ms_per_example_timestep']:.2f} ms" for name in names)])
    rows.append(["examples per second, end to end",
                 *(f"{paths[name]['examples_per_s']:.0f}" for name in names)])
    per_repeat = {name: " / ".join(f"{r:.2f}" for r in paths[name]["ratios"]) for name in names}
    rows.append([
        f"**featurization / AdamW training step** ({results['train_step_per_sample_ms']:.2f} ms per sample)",
        *(f"**{paths[name]['relative_to_train_step']:.2f}x** ({per_repeat[name]})" for name in names),
    ])
    parts = ("features", "whitening", "I/O")
    seconds = [[name, *(f"{paths[name]['end_to_end_s'][part]:.2f}" for part in parts)] for name in names]
    intro = para(f"""
        `bench/featurize_profile.py` times each stage of featurization (D-TRAK's `square` output, the script's
        default) on the shipped model and {results['images']} mnist5k training images x {results['buckets']}
        buckets, with one timestep and one noise draw per bucket, so that one row is one (example, timestep)
        pair; batches of {batch} rows, k = {results['proj_dim']}, {results['threads']} torch threads. In every
        repeat it also times one batched AdamW training step of the same model at the same batch size; the
        last row is the median of the per-repeat ratios (each repeat in brackets). A stage row is the stage's
        time for one batch divided by {batch}. The two-pass stages (backward, then the blocks) are shown for
        scale; the one-pass backward is what `features()` runs.""")
    return "\n\n".join([
        intro, commands(PROFILE_COMMAND), f"Results ({source_links([PROFILE])}):",
        table(["per (example, timestep)", *names], rows),
        f"End to end, seconds for {results['images']} images x {results['buckets']} buckets:",
        table(["path", "features s", "whitening s", "I/O s"], seconds),
    ])


# ------------------------------------------------------------------------------------------------------------
# parameter subsets

SUBSETS = "param_subsets.json"
SUBSETS_COMMAND = f"python bench/param_subsets.py --json bench/results/{SUBSETS}"


@page("docs/benchmarks/param_subsets.md", "Featurizing a parameter subset (`--params`)",
      "speed and agreement with the full exact scores when only some parameters' gradient is featurized",
      SUBSETS)
def param_subsets() -> str:
    results = load(SUBSETS)
    args = results["args"]
    rows = [[row["subset"], row["projector"], f"{row['num_params']:,}", f"{row['norm_share']:.1%}",
             f"{row['median_images_per_s']:.1f}", f"{row['spearman']['inner']['mean']:.4f}",
             f"{row['spearman']['cosine']['mean']:.4f}"] for row in results["rows"]]
    intro = para(f"""
        What does featurizing only some parameters' gradient (`precompute featurize --params PREFIX ...`) buy
        in speed and cost in accuracy? The setting of the traker bench: the shipped model, {args['n']} mnist5k
        training images, D-TRAK's `square` output over 10 timesteps, k = {args['proj_dim']}. For each subset
        and projector: images/s (median of {args['runs']} runs after a warm-up), the subset's share of the
        squared gradient norm (on 16 of the images), and the Spearman agreement of its scores for
        {args['queries']} held-out queries with the exact scores of the *full* gradient (all parameters,
        unprojected), averaged over {args['seeds']} projection seeds.""")
    return "\n\n".join([
        intro, commands(check_command(SUBSETS_COMMAND, args)), f"Results ({source_links([SUBSETS])}):",
        table(["parameters", "projector", "parameters featurized", "share of the squared gradient norm",
               "images/s", "Spearman, inner product", "Spearman, cosine"], rows),
    ])


# ------------------------------------------------------------------------------------------------------------
# memory allocator

ALLOCATOR = ("allocator_ab_countsketch.json", "allocator_ab_kronecker.json",
             "allocator_ab_kronecker_traker_spec.json")


def allocator_command(args: dict) -> str:
    parts = ["python bench/allocator_ab.py"]
    if args["projector"] != "countsketch":
        parts.append(f"--projector {args['projector']}")
    if args["calibrate"]:
        parts.append(f"--calibrate {args['calibrate']}")
    if args.get("featurize_args"):
        parts.append(f"--featurize-args \"{args['featurize_args']}\"")
    return " ".join([*parts, f"--json {args['json']}"])


@page("docs/benchmarks/allocator.md", "Memory allocator settings",
      "featurize time, peak memory and page faults with and without explorer.allocator's glibc malloc "
      "settings", *ALLOCATOR)
def allocator() -> str:
    rows = []
    for name in ALLOCATOR:
        results = load(name)
        args = results["args"]
        spec = f"`{args['featurize_args']}`" if args.get("featurize_args") else "the shipped spec"
        cells = []
        for side in ("defaults", "tuned"):
            runs = results["runs"][side]

            def middle(key: str, runs=runs) -> float:
                return statistics.median(run[key] for run in runs)

            cells.append(f"{middle('seconds'):.1f} s, {middle('peak_rss_gb'):.2f} GB, "
                         f"{middle('page_faults') / 1e6:.2f}M, {middle('system_s'):.1f} s")
        label = f"{args['projector']}{', calibrated' if args['calibrate'] else ''}, {spec}"
        rows.append([label, *cells, f"**{results['speedup']:.2f}x**"])
    first = load(ALLOCATOR[0])["args"]
    intro = para(f"""
        `FeatureComputer` sets glibc's malloc, once per process, to serve blocks under 32 MiB from its heap
        and never to shrink it (`explorer/allocator.py`; `EXPLORER_MALLOC_TUNING=0` keeps glibc's defaults).
        What does that change? `bench/allocator_ab.py` runs `precompute featurize --limit {first['images']}`
        in fresh processes, alternately with `EXPLORER_MALLOC_TUNING=0` and without ({first['rounds']}
        rounds), and reads from each process its featurization seconds (featurize's own report), peak RSS,
        minor page faults and system CPU time (the whole process, start-up included). Cells are medians over
        the rounds; the speed-up is the median of the within-round ratios of featurization seconds, defaults
        over tuned.""")
    return "\n\n".join([
        intro, commands(*(allocator_command(load(name)["args"]) for name in ALLOCATOR)),
        f"Results ({source_links(ALLOCATOR)}):",
        table([f"featurize, {first['images']} images",
               "glibc defaults: seconds, peak RSS, page faults, system time", "tuned",
               "speed-up (defaults / tuned)"], rows),
    ])


# ------------------------------------------------------------------------------------------------------------
# index at scale

SCALE = "index_scale.json"


@page("docs/benchmarks/index_scale.md", "Index at scale: flat, IVF and HNSW",
      "query latency, build time and recall@10 of exact and approximate FAISS indexes at 100k and 1M rows",
      SCALE)
def index_scale() -> str:
    results = load(SCALE)
    rows = results["rows"]
    threads = results["faiss_threads"]
    intro = para(f"""
        Can one index serve a million training images? `bench/index_scale.py` builds an exact `IndexFlatIP`,
        `IndexIVFFlat` (nlist = f sqrt(N), as `--index-type ivf` builds them) and `IndexHNSWFlat` over
        synthetic unit vectors at the shipped k from three data models: a Gaussian mixture, one continuous
        anisotropic Gaussian (no clusters: the hard case), and the shipped index's least structured bucket
        tiled with noise. {results['queries']} held-out queries (on the flat index {results['flat_queries']})
        are each searched as q (positive influencers) and -q (negative influencers); single-query latency with
        faiss threads {threads['queries']} (as the explorer runs), builds with {threads['builds']} threads;
        recall@10 against the exact flat search. "rule" rows are what `--index-type ivf` does by itself: nlist
        = 4 sqrt(N), and nprobe for q and for -q calibrated on the index's own rows until recall@10 reaches
        0.95.""")

    def cells(row: dict) -> list[str]:
        return [row["data"], row["index"], row["params"], f"{row['build_s']:.1f}",
                f"{row['median_ms_pos']:.2f} / {row['median_ms_neg']:.2f}", f"{row['p95_ms']:.2f}",
                f"{row['recall_pos']:.3f} / {row['recall_neg']:.3f}"]

    sizes = sorted({row["n"] for row in rows}, reverse=True)
    glance = []
    for n in sizes:
        for data in dict.fromkeys(row["data"] for row in rows):
            same = [row for row in rows if row["n"] == n and row["data"] == data]
            flat = next(row for row in same if row["index"] == "flat")
            for rule in (row for row in same if row["params"].startswith("rule")):
                glance.append([f"{n:,}", data, f"{flat['median_ms_pos']:.1f} / {flat['median_ms_neg']:.1f}",
                               rule["params"].removeprefix("rule: "),
                               f"{rule['median_ms_pos']:.2f} / {rule['median_ms_neg']:.2f}",
                               f"{rule['recall_pos']:.3f} / {rule['recall_neg']:.3f}",
                               f"{rule['build_s']:.1f}"])
    recorded = [strip_lock(command).replace("  (", "   # (", 1) for command in results["commands"]]
    parts = [intro, commands(*recorded),
             f"At a glance, the exact search against the rule ({source_links([SCALE])}):",
             table(["N", "data", "flat: median ms, q / -q", "IVF rule", "rule: median ms, q / -q",
                    "rule: recall@10, q / -q", "rule: build s"], glance)]
    for n in sizes:
        dims = ", ".join(map(str, sorted({row["dim"] for row in rows if row["n"] == n})))
        parts += [f"## N = {n:,} (k = {dims})",
                  table(["data", "index", "parameters", "build s", "median ms, q / -q", "p95 ms",
                         "recall@10, q / -q"], [cells(row) for row in rows if row["n"] == n])]
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------------------------
# attribution accuracy on digits (precompute's own renderers write the tables)

LDS = "lds_digits.json"
COUNTERFACTUAL = "counterfactual_digits.json"
SHIPPED_SETTINGS = "dtrak-mean-norm@k=512,lambda=0.003"  # the shipped index's output, k and lambda


def accuracy_headline(results: dict | None = None) -> dict:
    """The README's accuracy figures: LDS over all queries: the shipped index's settings, pixel cosine."""
    results = results or load(LDS)
    return {"shipped": results["defaults"]["rows"][SHIPPED_SETTINGS]["lds"]["all"],
            "pixel": results["methods"]["pixel"]["lds"]["all"]}


@page("docs/benchmarks/lds_digits.md", "Attribution accuracy: LDS on digits",
      "linear datamodeling score of every method on sklearn's digits, the papers' claims, and the study "
      "behind the shipped defaults (output, k, lambda, storage)", LDS)
def lds_digits() -> str:
    from precompute.eval_report import GROUPS, lds_markdown

    results = load(LDS)
    config, queries, methods = results["config"], results["queries"], results["methods"]
    recipe = config["recipe"]
    steps = [key for key in queries if key.startswith("journey@")]
    order = sorted(methods, key=lambda m: -methods[m]["lds"]["all"]["mean"])

    def step_label(key: str) -> str:
        step = int(key.removeprefix("journey@step"))
        return f"step {step} (t ~ {1000 - 1000 * step // config['sampler_steps']}; {queries[key]} queries)"

    per_step = table(["method", *map(step_label, steps)],
                     [[name, *(f"{methods[name]['lds'][key]['mean']:.3f}" for key in steps)]
                      for name in order])
    intro = para(f"""
        How well do the attribution methods predict what training data does to the model? `precompute evaluate
        lds` retrains {results['subsets']} models of one fixed recipe (a tiny UNet, {recipe['steps']} AdamW
        steps of batch {recipe['batch_size']}, lr {recipe['learning_rate']:g}, seed {recipe['seed']}) on
        random halves (alpha {config['alpha']}) of the {results['train_size']} training images of sklearn's
        8x8 digits, and measures how well each method's scores, computed on the model trained on all of them,
        predict each subset model's diffusion loss on {queries['all']} queries: {queries['heldout']} held-out
        digits, {queries['generated']} generated images, and {queries['journey']} per-step queries (the
        one-step estimate x0hat of {config['trajectories']} generated trajectories at sampler steps
        {', '.join(map(str, config['journey_steps']))} of {config['sampler_steps']}, attributed at their
        step's bucket as the explorer does). The measure is the linear datamodeling score (LDS): per query,
        the Spearman correlation over subset models of the true loss with the loss the scores predict. Tables
        give the mean over queries and a 95% bootstrap interval over subset models ({config['bootstrap']}
        resamples, the same for every method, so differences get paired intervals). A score > 0 means
        "including this training image lowers the query's loss"; the sign check is the Spearman correlation of
        the loss with the number of the query's top-50 positive influencers in the subset, negative when the
        sign is right. Query groups: {', '.join(GROUPS)} (the per-step queries). The results predate centering
        (`--center`, now featurize's default): no method here is centered.""")
    method_list = para("""
        Methods (`precompute/methods.py`, `precompute/baselines.py`): `trak-loss` is TRAK (output: the
        training loss); `dtrak-square`, `-mean`, `-l1`, `-l2` are D-TRAK with those output functions; `-norm`
        adds Diffusion-ReTrac normalization (both whitened vectors L2-normalized); `das-*` scale the training
        rows by DAS residual weights; `tracin` is Diffusion-TracIn over 4 checkpoints and `retrac` the same
        with unit-norm gradients; `pixel`, `embedding` (the feature classifier's penultimate layer) and
        `random` are baselines. In the main table lambda is chosen by GCV on the training features; the
        shipped-default study compares fixed relative lambdas picked on one half of the queries and subset
        models and reported on the other.""")
    reproduce = para("""
        Everything expensive (models, ground truth, features) is cached in `bench/cache/lds-digits/`
        (git-ignored), so a killed run resumes. The command writes `bench/results/lds_digits.json` (this
        page), `lds_digits.npz` (subset masks, ground truth, per-query LDS), `lds_digits.md` and the plot
        below; `--smoke` runs the harness end to end on tiny settings.""")
    best = methods[results["best_method"]]
    chosen = "; ".join(f"`{family.split('@')[0]}` {entry['chosen']}"
                       for family, entry in results["defaults"]["fair"].items() if entry["k"] == 512)
    summary = "\n".join([
        para(f"""- With GCV's lambda (the main table) the best method is `{results['best_method']}`
            ({best['label']}): LDS {interval(best['lds']['all'])} over all {queries['all']} queries; pixel
            cosine {interval(methods['pixel']['lds']['all'])}; random
            {interval(methods['random']['lds']['all'])}."""),
        para(f"""- Relative lambda picked fairly (on half of the queries with the even subset models, as the
            shipped-default study below does) at k = 512: {chosen}."""),
        para(f"""- The shipped index's settings (`dtrak-mean-norm`, k = 512, relative lambda 0.003) score LDS
            {interval(accuracy_headline(results)['shipped'])} over all queries here."""),
    ])
    return "\n\n".join([
        intro, method_list, commands("python -m precompute evaluate lds --benchmark digits"), reproduce,
        "## In short", summary,
        f"## Results ({source_links([LDS])})", lds_markdown(results),
        "## Per-step queries by sampler step",
        "Mean LDS of the per-step queries at each sampler step:", per_step,
        "![LDS per method and query kind](../../bench/results/lds_digits.png)",
    ])


@page("docs/benchmarks/counterfactual_digits.md", "Counterfactual retraining on digits",
      "retraining without a generated image's top influencers, against removing random or pixel-nearest "
      "images", COUNTERFACTUAL)
def counterfactual_digits() -> str:
    from precompute.counterfactual import counterfactual_markdown

    results = load(COUNTERFACTUAL)
    config = results["config"]
    intro = para(f"""
        Does removing a query's top influencers change what the model generates more than removing random or
        pixel-nearest training images (Journey-TRAK, section 5.3)? `precompute evaluate counterfactual` takes
        {config['queries']} generated trajectories of the digits benchmark's full model (seeds
        {config['seed0']}-{config['seed0'] + config['queries'] - 1}), uses x0hat at sampler step
        {config['step']} of {config['sampler_steps']} (t = {results['timestep']}) as the query, attributes it
        with `{config['method']}`, and retrains the model without the top k influencers, without k random
        images ({config['random_sets']} sets) and without the k pixel-nearest images of the final image (k =
        {', '.join(map(str, results['ks']))}). Each retrained model completes the same x_t
        {config['completions']} times with the same sampler seed. The tables give how much the probability of
        the full model's final class drops, the total-variation distance of the class distribution and the
        energy distance of the completions from the full model's, with 95% bootstrap intervals over queries.
        It shares the model cache of `evaluate lds` (run that first).""")
    return "\n\n".join([intro, commands("python -m precompute evaluate counterfactual"),
                        f"Results ({source_links([COUNTERFACTUAL])}):", counterfactual_markdown(results)])


# ------------------------------------------------------------------------------------------------------------
# index pages


@page("docs/evaluation.md", "Attribution accuracy", "where the attribution-accuracy measurements live")
def evaluation() -> str:
    return "\n\n".join([
        para("""The accuracy measurements of the attribution methods are generated pages, written by `python
            bench/report.py` from the results in `bench/results/`:"""),
        "\n".join([
            para("""- [LDS on digits](benchmarks/lds_digits.md): the linear datamodeling score of every
                method, the papers' claims checked, the ablations, and the study behind the shipped defaults
                (output function, k, lambda, storage);"""),
            para("""- [Counterfactual retraining on digits](benchmarks/counterfactual_digits.md): removing a
                generated image's top influencers against removing random or pixel-nearest images."""),
        ]),
        "Every benchmark page is listed in [docs/benchmarks](benchmarks/README.md).",
    ])


UNRECORDED = (
    ("bench/app_latency.py", "web app start-up, generate, slider and rollout latency"),
    ("bench/load.py", "concurrent gradio_client sessions generating and scrubbing"),
    ("bench/precision_agreement.py",
     "agreement of fp32 and bf16 kronecker features with exact scores, per timestep"),
    ("bench/projection_agreement.py", "agreement of projected scores with exact ones, by projector and k"),
)


def index_page() -> str:
    listed = [[f"[{p.title}]({Path(p.path).name})", p.summary, source_links(p.sources)]
              for p in PAGES if p.path.startswith("docs/benchmarks/")]
    return "\n\n".join([
        para("""Each page says what was measured and the command that wrote its result file, then shows tables
            rendered from that file. `python bench/report.py` writes every page from `bench/results/`; do not
            edit them by hand, rerun the benchmark and then the script. `python bench/report.py --check` (run
            by `tests/test_docs.py`) fails when a page is stale."""),
        table(["page", "what it measures", "result files"], listed),
        para("These scripts print their tables but keep no result file, so no page shows them: "
             + "; ".join(f"`{script}` ({what})" for script, what in UNRECORDED) + "."),
    ])


INDEX = Page("docs/benchmarks/README.md", "Benchmarks", "the list of benchmark pages", (), index_page)


# ------------------------------------------------------------------------------------------------------------


def all_pages() -> list[Page]:
    return [*PAGES, INDEX]


def render(page_: Page) -> str:
    sources = ", ".join(f"bench/results/{name}" for name in page_.sources) or "the page list"
    return (f"<!-- generated by bench/report.py from {sources}; edit the script, not this page -->\n\n"
            f"# {page_.title}\n\n{page_.build().rstrip()}\n")


def stale_pages() -> list[str]:
    """Pages (paths relative to the repository root) whose file differs from what render() writes."""
    return [p.path for p in all_pages()
            if not (ROOT / p.path).exists() or (ROOT / p.path).read_text() != render(p)]


def write_pages() -> list[str]:
    written = []
    for page_ in all_pages():
        path, text = ROOT / page_.path, render(page_)
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(page_.path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 and name the pages that would change")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for path in stale:
            print(f"stale: {path} (run python bench/report.py)")
        return 1 if stale else 0
    written = write_pages()
    print(f"{len(all_pages())} pages, {len(written)} rewritten"
          + (": " + ", ".join(written) if written else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
