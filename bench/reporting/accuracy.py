"""Accuracy pages: LDS and counterfactual retraining on digits, and docs/evaluation.md."""

from __future__ import annotations

from pathlib import Path

from bench.reporting.core import available_pages, commands, interval, load, page, para, source_links, table

# ------------------------------------------------------------------------------------------------------------
# attribution accuracy on digits (precompute's own renderers write the tables)

LDS = "lds_digits.json"
COUNTERFACTUAL = "counterfactual_digits.json"
SHIPPED_SETTINGS = "dtrak-mean-norm@k=512,lambda=0.003"  # the shipped index's output, k and lambda


def accuracy_headline(results: dict | None = None) -> dict:
    """The README's accuracy figures: LDS over all queries: the shipped index's settings, pixel cosine."""
    results = results or load(LDS)
    return {
        "shipped": results["defaults"]["rows"][SHIPPED_SETTINGS]["lds"]["all"],
        "pixel": results["methods"]["pixel"]["lds"]["all"],
    }


@page(
    "docs/benchmarks/lds_digits.md",
    "Attribution accuracy: LDS on digits",
    "linear datamodeling score of every method on sklearn's digits, the papers' claims, and the study "
    "behind the shipped defaults (output, k, lambda, storage)",
    LDS,
)
def lds_digits() -> str:
    from precompute.evaluation.digits.report import GROUPS, lds_markdown

    results = load(LDS)
    config, queries, methods = results["config"], results["queries"], results["methods"]
    recipe = config["recipe"]
    steps = [key for key in queries if key.startswith("journey@")]
    order = sorted(methods, key=lambda m: -methods[m]["lds"]["all"]["mean"])

    def step_label(key: str) -> str:
        step = int(key.removeprefix("journey@step"))
        return f"step {step} (t ~ {1000 - 1000 * step // config['sampler_steps']}; {queries[key]} queries)"

    per_step = table(
        ["method", *map(step_label, steps)],
        [[name, *(f"{methods[name]['lds'][key]['mean']:.3f}" for key in steps)] for name in order],
    )
    intro = para(f"""
        How well do the attribution methods predict what training data does to the model? `precompute evaluate
        lds` retrains {results["subsets"]} models of one fixed recipe (a tiny UNet, {recipe["steps"]} AdamW
        steps of batch {recipe["batch_size"]}, lr {recipe["learning_rate"]:g}, seed {recipe["seed"]}) on
        random halves (alpha {config["alpha"]}) of the {results["train_size"]} training images of sklearn's
        8x8 digits, and measures how well each method's scores, computed on the model trained on all of them,
        predict each subset model's diffusion loss on {queries["all"]} queries: {queries["heldout"]} held-out
        digits, {queries["generated"]} generated images, and {queries["journey"]} per-step queries (the
        one-step estimate x0hat of {config["trajectories"]} generated trajectories at sampler steps
        {", ".join(map(str, config["journey_steps"]))} of {config["sampler_steps"]}, attributed at their
        step's bucket as the explorer does). The measure is the linear datamodeling score (LDS): per query,
        the Spearman correlation over subset models of the true loss with the loss the scores predict. Tables
        give the mean over queries and a 95% bootstrap interval over subset models ({config["bootstrap"]}
        resamples, the same for every method, so differences get paired intervals). A score > 0 means
        "including this training image lowers the query's loss"; the sign check is the Spearman correlation of
        the loss with the number of the query's top-50 positive influencers in the subset, negative when the
        sign is right. Query groups: {", ".join(GROUPS)} (the per-step queries). The results predate centering
        (`--center`, now featurize's default): no method here is centered.""")
    method_list = para("""
        Methods (`precompute/evaluation/digits/scores.py`, `precompute/evaluation/baselines.py`): `trak-loss`
        is TRAK (output: the training loss); `dtrak-square`, `-mean`, `-l1`, `-l2` are D-TRAK with those
        output functions; `-norm` adds Diffusion-ReTrac normalization (both whitened vectors L2-normalized);
        `das-*` scale the training rows by residual weights, the scalar shortcut of DAS's released code (the
        paper's DAS is scored on the [methods page](methods.md)); `tracin` is Diffusion-TracIn over 4
        checkpoints and `retrac` the same with unit-norm gradients; `pixel`, `embedding` (the feature
        classifier's penultimate layer) and `random` are baselines. In the main table lambda is chosen by GCV
        on the training features; the shipped-default study compares fixed relative lambdas picked on one half
        of the queries and subset models and reported on the other.""")
    reproduce = para("""
        Everything expensive (models, ground truth, features) is cached in `bench/cache/lds-digits/`
        (git-ignored), so a killed run resumes. The command writes `bench/results/lds_digits.json` (this
        page), `lds_digits.npz` (subset masks, ground truth, per-query LDS), `lds_digits.md` and the plot
        below; `--smoke` runs the harness end to end on tiny settings.""")
    best = methods[results["best_method"]]
    chosen = "; ".join(
        f"`{family.split('@')[0]}` {entry['chosen']}"
        for family, entry in results["defaults"]["fair"].items()
        if entry["k"] == 512
    )
    summary = "\n".join(
        [
            para(f"""- With GCV's lambda (the main table) the best method is `{results["best_method"]}`
            ({best["label"]}): LDS {interval(best["lds"]["all"])} over all {queries["all"]} queries; pixel
            cosine {interval(methods["pixel"]["lds"]["all"])}; random
            {interval(methods["random"]["lds"]["all"])}."""),
            para(f"""- Relative lambda picked fairly (on half of the queries with the even subset
            models, as the
            shipped-default study below does) at k = 512: {chosen}."""),
            para(f"""- The shipped index's settings (`dtrak-mean-norm`, k = 512, relative lambda 0.003)
            score LDS
            {interval(accuracy_headline(results)["shipped"])} over all queries here."""),
        ]
    )
    return "\n\n".join(
        [
            intro,
            method_list,
            commands("python -m precompute evaluate lds --benchmark digits"),
            reproduce,
            "## In short",
            summary,
            f"## Results ({source_links([LDS])})",
            lds_markdown(results),
            "## Per-step queries by sampler step",
            "Mean LDS of the per-step queries at each sampler step:",
            per_step,
            "![LDS per method and query kind](../../bench/results/lds_digits.png)",
        ]
    )


@page(
    "docs/benchmarks/counterfactual_digits.md",
    "Counterfactual retraining on digits",
    "retraining without a generated image's top influencers, against removing random or pixel-nearest images",
    COUNTERFACTUAL,
)
def counterfactual_digits() -> str:
    from precompute.evaluation.counterfactual import counterfactual_markdown

    results = load(COUNTERFACTUAL)
    config = results["config"]
    intro = para(f"""
        Does removing a query's top influencers change what the model generates more than removing random or
        pixel-nearest training images (Journey-TRAK, section 5.3)? `precompute evaluate counterfactual` takes
        {config["queries"]} generated trajectories of the digits benchmark's full model (seeds
        {config["seed0"]}-{config["seed0"] + config["queries"] - 1}), uses x0hat at sampler step
        {config["step"]} of {config["sampler_steps"]} (t = {results["timestep"]}) as the query, attributes it
        with `{config["method"]}`, and retrains the model without the top k influencers, without k random
        images ({config["random_sets"]} sets) and without the k pixel-nearest images of the final image (k =
        {", ".join(map(str, results["ks"]))}). Each retrained model completes the same x_t
        {config["completions"]} times with the same sampler seed. The tables give how much the probability of
        the full model's final class drops, the total-variation distance of the class distribution and the
        energy distance of the completions from the full model's, with 95% bootstrap intervals over queries.
        It shares the model cache of `evaluate lds` (run that first).""")
    return "\n\n".join(
        [
            intro,
            commands("python -m precompute evaluate counterfactual"),
            f"Results ({source_links([COUNTERFACTUAL])}):",
            counterfactual_markdown(results),
        ]
    )


# ------------------------------------------------------------------------------------------------------------
# index pages


# accuracy pages of bench/reporting/steps.py, listed here once their results exist: path -> what they show
LATER_ACCURACY = {
    "docs/benchmarks/lds_mnist5k.md": """the linear datamodeling score of the served index and the baselines
        on subset models of the shipped architecture, whole images and per sampler step""",
    "docs/benchmarks/step_quality.md": """top-10 label agreement, score spread and positive-scored negatives
        of the served indexes at every bucket's timestep, without retraining""",
}


@page("docs/evaluation.md", "Attribution accuracy", "where the attribution-accuracy measurements live")
def evaluation() -> str:
    items = [
        """- [LDS on digits](benchmarks/lds_digits.md): the linear datamodeling score of every method, the
            papers' claims checked, the ablations, and the study behind the shipped defaults (output function,
            k, lambda, storage)""",
        """- [Counterfactual retraining on digits](benchmarks/counterfactual_digits.md): removing a generated
            image's top influencers against removing random or pixel-nearest images""",
    ]
    items += [
        f"- [{p.title}](benchmarks/{Path(p.path).name}): {LATER_ACCURACY[p.path]}"
        for p in available_pages()
        if p.path in LATER_ACCURACY
    ]
    return "\n\n".join(
        [
            para("""The accuracy measurements of the attribution methods are generated pages, written by
            `python -m bench.report` from the results in `bench/results/`:"""),
            "\n".join(
                para(item) + (";" if position < len(items) - 1 else ".")
                for position, item in enumerate(items)
            ),
            "Every benchmark page is listed in [docs/benchmarks](benchmarks/README.md).",
        ]
    )
