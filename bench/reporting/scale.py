"""Speed pages at the edges of featurization: the memory allocator's settings and the index at scale."""

from __future__ import annotations

import statistics

from bench.reporting.core import (
    commands,
    load,
    page,
    para,
    source_links,
    strip_lock,
    table,
)

# ------------------------------------------------------------------------------------------------------------
# memory allocator

ALLOCATOR = "allocator_ab.json"
ALLOCATOR_CASES = ("countsketch", "kronecker", "kronecker_traker_spec")


def allocator_command(args: dict) -> str:
    parts = ["python -m bench.allocator_ab"]
    if args["projector"] != "countsketch":
        parts.append(f"--projector {args['projector']}")
    if args["calibrate"]:
        parts.append(f"--calibrate {args['calibrate']}")
    if args.get("featurize_args"):
        parts.append(f'--featurize-args "{args["featurize_args"]}"')
    return " ".join([*parts, f"--json {args['json']} --case {args['case']}"])


@page(
    "docs/benchmarks/allocator.md",
    "Memory allocator settings",
    "featurize time, peak memory and page faults with and without precompute.featurize.allocator's glibc "
    "malloc settings",
    ALLOCATOR,
)
def allocator() -> str:
    rows = []
    cases = load(ALLOCATOR)["cases"]
    for name in ALLOCATOR_CASES:
        results = cases[name]
        args = results["args"]
        spec = f"`{args['featurize_args']}`" if args.get("featurize_args") else "the shipped spec"
        cells = []
        for side in ("defaults", "tuned"):
            runs = results["runs"][side]

            def middle(key: str, runs=runs) -> float:
                return statistics.median(run[key] for run in runs)

            cells.append(
                f"{middle('seconds'):.1f} s, {middle('peak_rss_gb'):.2f} GB, "
                f"{middle('page_faults') / 1e6:.2f}M, {middle('system_s'):.1f} s"
            )
        label = f"{args['projector']}{', calibrated' if args['calibrate'] else ''}, {spec}"
        rows.append([label, *cells, f"**{results['speedup']:.2f}x**"])
    first = cases[ALLOCATOR_CASES[0]]["args"]
    intro = para(f"""
        `precompute.featurize.workers.Featurizer` sets glibc's malloc, once per process, to serve blocks under
        32 MiB from its heap and never to shrink it (`precompute/featurize/allocator.py`;
        `EXPLORER_MALLOC_TUNING=0` keeps glibc's defaults).
        What does that change? `bench/allocator_ab.py` runs `precompute featurize --limit {first["images"]}`
        in fresh processes, alternately with `EXPLORER_MALLOC_TUNING=0` and without ({first["rounds"]}
        rounds), and reads from each process its featurization seconds (featurize's own report), peak RSS,
        minor page faults and system CPU time (the whole process, start-up included). Cells are medians over
        the rounds; the speed-up is the median of the within-round ratios of featurization seconds, defaults
        over tuned.""")
    return "\n\n".join(
        [
            intro,
            commands(*(allocator_command(cases[name]["args"]) for name in ALLOCATOR_CASES)),
            f"Results ({source_links([ALLOCATOR])}):",
            table(
                [
                    f"featurize, {first['images']} images",
                    "glibc defaults: seconds, peak RSS, page faults, system time",
                    "tuned",
                    "speed-up (defaults / tuned)",
                ],
                rows,
            ),
        ]
    )


# ------------------------------------------------------------------------------------------------------------
# index at scale

SCALE = "index_scale.json"


@page(
    "docs/benchmarks/index_scale.md",
    "Index at scale: flat, IVF and HNSW",
    "query latency, build time and recall@10 of exact and approximate FAISS indexes at 100k and 1M rows",
    SCALE,
)
def index_scale() -> str:
    results = load(SCALE)
    rows = results["rows"]
    threads = results["faiss_threads"]
    intro = para(f"""
        Can one index serve a million training images? `bench/index_scale.py` builds an exact `IndexFlatIP`,
        `IndexIVFFlat` (nlist = f sqrt(N), as `--index-type ivf` builds them) and `IndexHNSWFlat` over
        synthetic unit vectors at the shipped k from three data models: a Gaussian mixture, one continuous
        anisotropic Gaussian (no clusters: the hard case), and the shipped index's least structured bucket
        tiled with noise. {results["queries"]} held-out queries (on the flat index {results["flat_queries"]})
        are each searched as q (positive influencers) and -q (negative influencers); single-query latency with
        faiss threads {threads["queries"]} (as the explorer runs), builds with {threads["builds"]} threads;
        recall@10 against the exact flat search. "rule" rows are what `--index-type ivf` does by itself: nlist
        = 4 sqrt(N), and nprobe for q and for -q calibrated on the index's own rows until recall@10 reaches
        0.95.""")

    def cells(row: dict) -> list[str]:
        return [
            row["data"],
            row["index"],
            row["params"],
            f"{row['build_s']:.1f}",
            f"{row['median_ms_pos']:.2f} / {row['median_ms_neg']:.2f}",
            f"{row['p95_ms']:.2f}",
            f"{row['recall_pos']:.3f} / {row['recall_neg']:.3f}",
        ]

    sizes = sorted({row["n"] for row in rows}, reverse=True)
    glance = []
    for n in sizes:
        for data in dict.fromkeys(row["data"] for row in rows):
            same = [row for row in rows if row["n"] == n and row["data"] == data]
            flat = next(row for row in same if row["index"] == "flat")
            for rule in (row for row in same if row["params"].startswith("rule")):
                glance.append(
                    [
                        f"{n:,}",
                        data,
                        f"{flat['median_ms_pos']:.1f} / {flat['median_ms_neg']:.1f}",
                        rule["params"].removeprefix("rule: "),
                        f"{rule['median_ms_pos']:.2f} / {rule['median_ms_neg']:.2f}",
                        f"{rule['recall_pos']:.3f} / {rule['recall_neg']:.3f}",
                        f"{rule['build_s']:.1f}",
                    ]
                )
    recorded = [strip_lock(command).replace("  (", "   # (", 1) for command in results["commands"]]
    parts = [
        intro,
        commands(*recorded),
        f"At a glance, the exact search against the rule ({source_links([SCALE])}):",
        table(
            [
                "N",
                "data",
                "flat: median ms, q / -q",
                "IVF rule",
                "rule: median ms, q / -q",
                "rule: recall@10, q / -q",
                "rule: build s",
            ],
            glance,
        ),
    ]
    for n in sizes:
        dims = ", ".join(map(str, sorted({row["dim"] for row in rows if row["n"] == n})))
        parts += [
            f"## N = {n:,} (k = {dims})",
            table(
                [
                    "data",
                    "index",
                    "parameters",
                    "build s",
                    "median ms, q / -q",
                    "p95 ms",
                    "recall@10, q / -q",
                ],
                [cells(row) for row in rows if row["n"] == n],
            ),
        ]
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------------------------
# featurize over torchrun ranks

SHARDS = "shard_scale.json"


@page(
    "docs/benchmarks/shard_scale.md",
    "Featurize over torchrun ranks",
    "one process against torchrun ranks on the same cores, and a simulated 1M-row build through the shard "
    "path with each rank's peak memory",
    SHARDS,
)
def shard_scale() -> str:
    cases = load(SHARDS)["cases"]
    parts = [
        para("""`torchrun -m precompute featurize` deals the missing chunks to the ranks, sums each
        bucket's mean and kernel over gloo, and rank 0 writes the index (precompute.featurize.collective,
        precompute.featurize.sharded_fit).
        Measured with `bench/shard_scale.py`: whole-process wall times, and each rank's peak RSS as the rank
        reports it.""")
    ]
    if "ranks" in cases:
        ranks = cases["ranks"]
        parts += [
            "## One process against ranks on the same cores",
            para(f"""The shipped model and spec on the first {ranks["limit"]} mnist5k training images, int8
            storage, {ranks["cores"]} cores: one process with every core's threads, then ranks with the cores
            divided among them."""),
            commands(
                f"python -m bench.shard_scale ranks --limit {ranks['limit']} --json bench/results/{SHARDS}"
            ),
            table(
                [
                    "launch",
                    "threads per rank",
                    "seconds",
                    "speed-up over 1 process",
                    "peak RSS per rank (GB)",
                ],
                [
                    [
                        f"`{run['command'].split(' -m ')[0]}`",
                        run["threads_per_rank"],
                        f"{run['seconds']:.1f}",
                        f"{run['speedup_over_1']:.2f}x",
                        ", ".join(f"{gb:.2f}" for gb in run["peak_rss_gb_per_rank"]),
                    ]
                    for run in ranks["runs"].values()
                ],
            ),
        ]
    builds = {name: case for name, case in cases.items() if name.startswith("synthetic")}
    if builds:
        first = next(iter(builds.values()))
        parts += [
            "## A simulated large build",
            para(f"""{first["rows"]:,} training rows through the shard path without gradients: 2 ranks write
            seeded synthetic chunk files (a common direction plus noise), then sum the kernels, and rank 0
            whitens into a memmap one bucket at a time and writes int8 buckets: flat, IVF with its lists in
            memory, or IVF with its lists merged shard by shard into an on-disk file (`--ivf-on-disk`). Rank
            0's peak comes from the whitened rows (a memmap that nprobe calibration reads in full) and the
            k-means sample, not from the lists, which take N x k bytes per bucket in int8: keeping them on
            disk changes the build's peak little. What it changes is serving, where the lists are
            memory-mapped; the explorer still reads every row of a bucket once, for the percentiles."""),
            commands(*(case["command"] + f" --json bench/results/{SHARDS}" for case in builds.values())),
            table(
                [
                    "build",
                    "k",
                    "buckets",
                    "rank",
                    "writing chunks (s)",
                    "kernels and index (s)",
                    "peak RSS (GB)",
                    "index on disk (MB)",
                ],
                [
                    [
                        case.get("index_type", "flat")
                        + (", lists on disk" if case.get("ivf_on_disk") else ""),
                        case["dim"],
                        case["buckets"],
                        r["rank"],
                        f"{r['write_chunks_s']:.1f}",
                        f"{r['kernel_and_index_s']:.1f}",
                        f"{r['peak_rss_gb']:.2f}",
                        f"{r['index_bytes'] / 1e6:.0f}" if "index_bytes" in r else "",
                    ]
                    for case in builds.values()
                    for r in case["ranks"]
                ],
            ),
        ]
    parts.append(f"Results: {source_links([SHARDS])}.")
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------------------------
# the cost of featurizing your own model

OWN_MODEL = "own_model_cost.json"


@page(
    "docs/benchmarks/own_model_cost.md",
    "Featurizing your own model",
    "hours per 1,000 images for a CIFAR-10-sized DDPM and an SD 1.5-sized LoRA pipeline, on this CPU",
    OWN_MODEL,
)
def own_model_cost() -> str:
    cases = load(OWN_MODEL)["cases"]
    rows = [
        [
            name,
            f"{c['parameters'] / 1e6:.1f}M",
            f"{c.get('attributed_parameters') or c['parameters']:,}",
            f"{c.get('image_size', 32)} px",
            c["device"],
            f"{c['cores']} cores, {c['torch_threads']} torch threads",
            f"{c['gradients_per_second']:.3g}",
            f"{c['hours_per_1000_images']:,.1f}",
            f"{c['peak_rss_gb']:.2f}",
        ]
        for name, c in cases.items()
    ]
    return "\n\n".join(
        [
            para("""What does `precompute featurize` cost on models of the papers' sizes?
            `bench/own_model_cost.py` builds them with random weights (the cost does not depend on them) and
            featurizes random images with the default spec: 10 buckets, k = 512, exact per-example gradients
            projected by count-sketch. `cifar_ddpm` is the UNet2DModel of the DDPM paper's CIFAR-10 model;
            `sd15_lora` is a StableDiffusionPipeline with Stable Diffusion 1.5's UNet, VAE and text-encoder
            shapes and a rank-4 LoRA on the attention projections, featurized with `--params lora` (only the
            adapter's matrices are attributed, but every gradient still runs through the whole UNet).
            Hours per 1,000 images = 1,000 x buckets / gradients per second, on this 2-core CPU; no GPU
            was available to measure, so `--device cuda` has no figure here."""),
            commands(*[c["command"] + f" --json bench/results/{OWN_MODEL}" for c in cases.values()]),
            table(
                [
                    "case",
                    "UNet parameters",
                    "attributed parameters",
                    "image size",
                    "device",
                    "threads",
                    "gradients/s",
                    "hours per 1,000 images",
                    "peak RSS (GB)",
                ],
                rows,
            ),
            f"Results: {source_links([OWN_MODEL])}.",
        ]
    )


# ------------------------------------------------------------------------------------------------------------
# the app under concurrent sessions

LOAD = "load.json"


@page(
    "docs/benchmarks/load.md",
    "The app under concurrent sessions",
    "latency and server memory with 8 concurrent sessions generating and scrubbing",
    LOAD,
)
def load_page() -> str:
    cases = load(LOAD)["cases"]
    rows = [
        [
            c["sessions"],
            c["steps"],
            f"{c['latency']['generate']['p50_ms']:,} / {c['latency']['generate']['p95_ms']:,}",
            f"{c['latency']['scrub']['p50_ms']} / {c['latency']['scrub']['p95_ms']}",
            f"{c['memory_before']['rss_gb']:.2f}",
            f"{c['memory_after']['rss_gb']:.2f}",
            f"{c['memory_after']['peak_gb']:.2f}",
            c["mb_per_session"],
            c["errors"],
        ]
        for c in cases.values()
    ]
    return "\n\n".join(
        [
            para("""`bench/load.py` serves the shipped default with `python app.py` on 127.0.0.1 and runs
            concurrent gradio_client sessions in threads: each generates, then scrubs to random steps, and
            checks that it still sees its own trajectory. Latencies are client round trips (queueing behind
            the other sessions' engine calls included). Memory is the server process's resident set before the
            first session, after all of them, and its peak; per session = (after - before) / sessions. A
            session holds its trajectory and every step's scores; the engine calls' freed working set
            is returned to the system after each call (explorer.memory), and a session's state expires an
            hour after it last changed."""),
            commands(*(c["command"] + f" --json bench/results/{LOAD}" for c in cases.values())),
            table(
                [
                    "sessions",
                    "sampler steps",
                    "generate p50 / p95 (ms)",
                    "scrub p50 / p95 (ms)",
                    "server before (GB)",
                    "after (GB)",
                    "peak (GB)",
                    "MB per session",
                    "errors",
                ],
                rows,
            ),
            f"Results: {source_links([LOAD])}.",
        ]
    )
