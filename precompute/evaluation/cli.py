"""The `python -m precompute evaluate ...` subcommands: their options and what each runs."""

from __future__ import annotations

from precompute.cli_types import non_negative_int, positive_int


def add_retrain_options(parser, results: str, cache: str) -> None:
    """The options of the long retraining benchmarks, which resume from small committed files."""
    parser.add_argument(
        "--results",
        default=results,
        help="one small file per finished model (commit them: the "
        "benchmark resumes from them on any machine)",
    )
    parser.add_argument("--cache", default=cache, help="the retrained weights (not committed)")
    parser.add_argument(
        "--stop-after", type=positive_int, default=None, help="finish at most N models, then stop"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads per process (default 1: run one process per core; processes share the work)",
    )


def add_evaluate(commands) -> None:
    """The `evaluate` command and its subcommands, one per benchmark."""
    parser = commands.add_parser("evaluate", help="evaluate attributions")
    kinds = parser.add_subparsers(dest="evaluation", required=True)
    _add_label_agreement(kinds)
    _add_lds(kinds)
    _add_shipped_truth(kinds)
    _add_truth(kinds)
    _add_step_quality(kinds)
    _add_shipped_lds(kinds)
    _add_step_counterfactual(kinds)
    _add_counterfactual(kinds)


def _add_label_agreement(kinds) -> None:
    """`evaluate label-agreement`: top-k label agreement of index directories (no retraining)."""
    agreement = kinds.add_parser(
        "label-agreement", help="share of top-10 positive influencers with the query's label"
    )
    agreement.add_argument("--model", required=True)
    agreement.add_argument(
        "--index", required=True, nargs="+", help="one or more index directories to compare"
    )
    agreement.add_argument("--data", default="mnist5k", help="dataset whose held-out split gives the queries")
    agreement.add_argument("--timesteps", type=non_negative_int, nargs="+", default=[100, 500, 900])
    agreement.add_argument("--top-k", type=positive_int, default=10)
    agreement.add_argument(
        "--queries", type=positive_int, default=None, help="use only the first N held-out images"
    )
    agreement.set_defaults(run=run_label_agreement)


def _add_lds(kinds) -> None:
    """`evaluate lds`: the digits LDS benchmark."""
    lds = kinds.add_parser(
        "lds", help="linear datamodeling score of every method (trains and caches subset models)"
    )
    lds.add_argument(
        "--benchmark", choices=("digits",), default="digits", help="the benchmark data (digits: sklearn 8x8)"
    )
    lds.add_argument(
        "--subsets", type=positive_int, default=None, help="subset models M (default 64; 4 with --smoke)"
    )
    lds.add_argument("--smoke", action="store_true", help="tiny end-to-end run of the harness (~1-3 min)")
    lds.add_argument(
        "--cache", default=None, help="cache of models/features (default bench/cache/lds-digits[-smoke])"
    )
    lds.add_argument(
        "--results",
        default=None,
        help="where the JSON/NPZ results go (default bench/results; the smoke run writes into its cache)",
    )
    lds.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)"
    )
    lds.set_defaults(run=run_lds)


def _add_shipped_truth(kinds) -> None:
    """`evaluate shipped-truth`: the shipped model's 600-step ground truth."""
    truth = kinds.add_parser(
        "shipped-truth",
        help="the shipped model's LDS ground truth: retrain subset models of its "
        "training set and measure them (hours; resumable; several processes may share the work)",
    )
    truth.add_argument(
        "--model", default="assets/model", help="the attributed model (its architecture is retrained)"
    )
    truth.add_argument("--data", default="mnist5k")
    add_retrain_options(truth, "bench/results/lds_mnist5k", "bench/cache/lds-mnist5k")
    truth.set_defaults(run=run_shipped_truth)


def _add_truth(kinds) -> None:
    """`evaluate truth`: the ground truth with shared seeds, measured at several training lengths."""
    ground = kinds.add_parser(
        "truth",
        help="the LDS ground truth with signal: subset models x shared seeds, measured at each of --stops "
        "with identical evaluation draws (hours; resumable; several processes may share the work)",
    )
    ground.add_argument(
        "--model", default="assets/model", help="the attributed model (its architecture is retrained)"
    )
    ground.add_argument("--data", default="mnist5k")
    ground.add_argument("--subsets", type=positive_int, default=64, help="random halves (default 64)")
    ground.add_argument(
        "--seeds",
        type=non_negative_int,
        nargs="+",
        default=[0, 1, 2],
        help="recipe seeds, shared by every subset (default 0 1 2)",
    )
    ground.add_argument(
        "--stops",
        type=positive_int,
        nargs="+",
        default=[1250],
        help="training steps at which every model is measured (default 1250)",
    )
    ground.add_argument(
        "--queries-from",
        default="bench/results/lds_mnist5k",
        help="the folder whose queries.npz the truth measures (copied once)",
    )
    add_retrain_options(ground, "bench/results/truth_mnist5k", "bench/cache/truth-mnist5k")
    ground.set_defaults(run=run_ground_truth)


def _add_step_quality(kinds) -> None:
    """`evaluate step-quality`: per-bucket quality of served indexes on held-out digits."""
    quality = kinds.add_parser(
        "step-quality",
        help="per bucket, on held-out digits: top-10 label agreement, spread of "
        "the top-10 scores, share of queries with a positive-scored 'negative' (dev/test/all)",
    )
    quality.add_argument("--model", default="assets/model")
    quality.add_argument("--index", nargs="+", default=["assets/index"])
    quality.add_argument(
        "--cache", default="bench/cache/step-quality", help="held-out query features are cached here"
    )
    quality.add_argument("--json", default="bench/results/step_quality.json")
    quality.set_defaults(run=run_step_quality)


def _add_shipped_lds(kinds) -> None:
    """`evaluate shipped-lds`: the LDS of index directories on the shipped model's ground truth."""
    shipped = kinds.add_parser(
        "shipped-lds",
        help="LDS of index directories on the shipped model's ground truth "
        "(dev and test splits, bootstrap over models and queries)",
    )
    shipped.add_argument("--model", default="assets/model")
    shipped.add_argument("--index", nargs="+", default=["assets/index"], help="index directories to score")
    shipped.add_argument(
        "--truth", default="bench/results/lds_mnist5k", help="the shipped-truth results folder"
    )
    shipped.add_argument("--cache", default="bench/cache/lds-mnist5k", help="query features are cached here")
    shipped.add_argument("--json", default="bench/results/lds_mnist5k.json")
    shipped.set_defaults(run=run_shipped_lds)


def _add_step_counterfactual(kinds) -> None:
    """`evaluate step-counterfactual`: the per-step counterfactual on the shipped model."""
    step_cf = kinds.add_parser(
        "step-counterfactual",
        help="per-step counterfactual on the shipped model: retrain without "
        "a step's top-k influencers, complete from the same x_t (hours; resumable)",
    )
    step_cf.add_argument("--model", default="assets/model")
    step_cf.add_argument("--index", default="assets/index", help="the served index whose top-k is removed")
    add_retrain_options(step_cf, "bench/results/step_counterfactual", "bench/cache/step-counterfactual")
    step_cf.add_argument(
        "--json",
        default="bench/results/step_counterfactual.json",
        help="the summary (per step, CIs over queries)",
    )
    step_cf.set_defaults(run=run_step_counterfactual)


def _add_counterfactual(kinds) -> None:
    """`evaluate counterfactual`: Journey-TRAK's counterfactual test on the digits."""
    counterfactual = kinds.add_parser(
        "counterfactual",
        help="retrain without a query's top influencers; compare with random and pixel-nearest removals",
    )
    counterfactual.add_argument(
        "--queries", type=positive_int, default=None, help="generated queries (default 20)"
    )
    counterfactual.add_argument(
        "--step", type=non_negative_int, default=None, help="sampler step of 50 (default 35)"
    )
    counterfactual.add_argument(
        "--method",
        default="best",
        help="TRAK-family method id (e.g. dtrak-square-norm), or "
        "'best': the best TRAK-family method of the LDS results (default)",
    )
    counterfactual.add_argument(
        "--smoke", action="store_true", help="tiny end-to-end run on the smoke LDS cache"
    )
    counterfactual.add_argument(
        "--cache",
        default=None,
        help="model cache, shared with `evaluate lds` (default bench/cache/lds-digits[-smoke])",
    )
    counterfactual.add_argument("--results", default=None, help="where the JSON goes (default bench/results)")
    counterfactual.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    counterfactual.set_defaults(run=run_counterfactual)


def run_counterfactual(args) -> None:
    import json
    from pathlib import Path

    from explorer.atomic import write_json_atomic
    from explorer.errors import ExplorerError
    from precompute.evaluation.counterfactual import (
        CounterfactualConfig,
        counterfactual_markdown,
        smoke_counterfactual,
    )
    from precompute.evaluation.counterfactual import (
        run_counterfactual as run_test,
    )
    from precompute.evaluation.retrain import torch_threads

    torch_threads(args.threads)
    config = smoke_counterfactual() if args.smoke else CounterfactualConfig()
    cache = args.cache or f"bench/cache/lds-digits{'-smoke' if args.smoke else ''}"
    results_dir = Path(args.results or (f"{cache}/results" if args.smoke else "bench/results"))
    if args.queries is not None:
        config.queries = args.queries
    if args.step is not None:
        config.step = args.step
    if args.method == "best":
        lds_path = results_dir / "lds_digits.json"
        if not lds_path.is_file():
            raise ExplorerError(
                f"--method best reads the LDS results {str(lds_path)!r}, which do not exist: run "
                "`python -m precompute evaluate lds` first, or pass --method dtrak-square-norm"
            )
        config.method = json.loads(lds_path.read_text())["best_method"]
    else:
        config.method = args.method
    results = run_test(config, cache)
    write_json_atomic(results_dir / "counterfactual_digits.json", results)
    print(counterfactual_markdown(results))
    print(f"\nresults written to {results_dir / 'counterfactual_digits.json'}")


def run_step_counterfactual(args) -> None:
    import json

    from precompute.evaluation.retrain import torch_threads
    from precompute.evaluation.shipped.step_counterfactual import run_step_counterfactual as run_models
    from precompute.evaluation.shipped.step_counterfactual import summarize

    torch_threads(args.threads)
    finished = run_models(args.results, args.cache, args.model, args.index, stop_after=args.stop_after)
    summary = summarize(args.results)
    print(json.dumps(summary["steps"], indent=1))
    print(f"{finished} models finished in this call; results in {args.results}")
    if summary["steps"]:
        from explorer.atomic import write_json_atomic
        from explorer.model import load_model
        from explorer.sampler import make_sampling_scheduler

        timesteps = make_sampling_scheduler(
            load_model(args.model), summary["config"]["sampler_steps"]
        ).timesteps
        summary["timesteps"] = {str(s): int(timesteps[s]) for s in summary["config"]["steps"]}
        summary["command"] = "python -m precompute evaluate step-counterfactual"
        write_json_atomic(args.json, summary)
        print(f"summary written to {args.json}")


def run_shipped_truth(args) -> None:
    from precompute.evaluation.retrain import torch_threads
    from precompute.evaluation.shipped.truth import run_truth

    torch_threads(args.threads)
    finished = run_truth(args.results, args.cache, args.model, args.data, stop_after=args.stop_after)
    print(f"{finished} subset models finished in this call; results in {args.results}")


def run_ground_truth(args) -> None:
    from precompute.evaluation.retrain import torch_threads
    from precompute.evaluation.shipped.ground_truth import GroundTruthConfig, run_ground_truth

    torch_threads(args.threads)
    config = GroundTruthConfig(
        subsets=args.subsets, seeds=tuple(args.seeds), stops=tuple(sorted(set(args.stops)))
    )
    finished = run_ground_truth(
        args.results, args.cache, args.model, args.data, config, args.queries_from, stop_after=args.stop_after
    )
    print(f"{finished} models finished in this call; results in {args.results}")


def run_step_quality(args) -> None:
    import sys as _sys
    from pathlib import Path

    from explorer.atomic import write_json_atomic
    from explorer.model import load_model
    from precompute.evaluation.shipped.step_quality import served_quality
    from precompute.evaluation.shipped.truth import shipped_split

    model = load_model(args.model)
    _, heldout = shipped_split("mnist5k", model.sample_size)
    results = {
        "command": "python -m precompute " + " ".join(_sys.argv[1:]),
        "indexes": served_quality(model, args.index, heldout.images, heldout.labels, Path(args.cache)),
    }
    write_json_atomic(Path(args.json), results)
    for directory, entry in results["indexes"].items():
        print(f"{directory} ({entry['label']}, {entry['storage']})")
        print("  t:                 " + " ".join(f"{t:>5}" for t in entry["per_bucket"]))
        for measure in ("label_agreement", "spread_min", "positive_negative_share"):
            print(
                f"  {measure:18s} "
                + " ".join(f"{v['test'][measure]:5.3f}" for v in entry["per_bucket"].values())
                + "  (test)"
            )
    print(f"written to {args.json}")


def run_shipped_lds(args) -> None:
    import sys as _sys
    from pathlib import Path

    from explorer.atomic import write_json_atomic
    from explorer.model import load_model
    from precompute.evaluation.shipped.lds import run_shipped_lds as run_table
    from precompute.evaluation.shipped.truth import shipped_split

    model = load_model(args.model)
    train, heldout = shipped_split("mnist5k", model.sample_size)
    results = run_table(args.index, model, args.truth, train.images, heldout.images, args.cache)
    results["command"] = "python -m precompute " + " ".join(_sys.argv[1:])
    write_json_atomic(Path(args.json), results)
    for name, entry in results["methods"].items():
        test = entry["test"]
        print(
            f"{name:40s} test LDS heldout {test['heldout']['mean']:.3f} generated "
            f"{test['generated']['mean']:.3f} "
            f"per-step {test['step_trajectory']['mean']:.3f} (proxy {test['step_proxy']['mean']:.3f})"
        )
    print(f"written to {args.json}")


def run_lds(args) -> None:
    import time

    from precompute.evaluation.digits.config import LDSConfig, smoke_config
    from precompute.evaluation.digits.lds import run_lds as run_benchmark
    from precompute.evaluation.digits.report import lds_markdown, save_run
    from precompute.evaluation.retrain import torch_threads

    torch_threads(args.threads)
    config = smoke_config() if args.smoke else LDSConfig()
    if args.subsets is not None:
        config.subsets = args.subsets
    cache = args.cache or f"bench/cache/lds-{args.benchmark}{'-smoke' if args.smoke else ''}"
    results = args.results or (f"{cache}/results" if args.smoke else "bench/results")
    started = time.perf_counter()
    run = run_benchmark(config, cache)
    run.results["timings_s"]["total (this call)"] = round(time.perf_counter() - started, 1)
    paths = save_run(run, results, cache)
    print(lds_markdown(run.results))
    print(
        f"\n{run.trained_subsets} subset models trained in this call; results written to "
        f"{', '.join(map(str, paths))}"
    )


def run_label_agreement(args) -> None:
    from precompute.evaluation.label_agreement import label_agreement_table

    print(label_agreement_table(args.model, args.index, args.data, args.timesteps, args.top_k, args.queries))
