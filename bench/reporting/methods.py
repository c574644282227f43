"""The methods page: every attribution method's LDS on the shipped model, and the seed papers' claims."""

from __future__ import annotations

from bench.reporting.core import commands, interval, load, page, para, source_links, table

METHODS = "methods_lds.json"

PAPERS = {  # what each seed paper claims, and what of it this benchmark can test
    "2312.06205": (
        "Journey-TRAK (Georgiev et al., arXiv 2312.06205)",
        "attributes each denoising step with TRAK and reports that its per-step attributions predict "
        "counterfactual model behaviour better than pixel or CLIP similarity. Here the per-step column is "
        "its query (x0hat of the step, at the step's bucket; the deviations from its definition as written "
        "are measured on [the per-step query page](journey_query.md)).",
    ),
    "2311.00500": (
        "D-TRAK (Zheng et al., arXiv 2311.00500)",
        "reports that output functions other than the training loss (`square`, `mean`, ...) give a higher "
        "LDS than TRAK's loss, against the theory's choice.",
    ),
    "2401.09031": (
        "Diffusion-TracIn / ReTrac (Xie et al., arXiv 2401.09031)",
        "reports a timestep-induced norm bias in TracIn (training images with large gradient norms, from "
        "the timesteps they were sampled at, dominate every query) and that renormalizing the gradients "
        "(ReTrac) removes it. Their evaluation is by retrieval and visual inspection, not LDS; the LDS "
        "difference below is our test of whether renormalization also predicts the counterfactuals better.",
    ),
    "2410.18639": (
        "DAS (Lin et al., arXiv 2410.18639)",
        "attributes the change of the noise predictor's output (a KL between the predictors with and without "
        "the example, linearized, one Newton step) instead of the loss, and reports a higher LDS than D-TRAK "
        "on CIFAR-2, CIFAR-10, CelebA and ArtBench. That score measures the change of the noise prediction, "
        "while the LDS here (as in the paper's released code) measures the loss; the rows below are the "
        "paper's form with either kernel, and the released code's shortcut, which keeps D-TRAK's rows.",
    ),
    "2410.13850": (
        "Influence functions for diffusion (Mlodozeniec et al., arXiv 2410.13850)",
        "uses EK-FAC approximations of the GGN of the diffusion loss and reports that these influence "
        "functions beat TRAK and D-TRAK on LDS without the per-method tuning D-TRAK needs. Its "
        "preconditioned gradients are sketched for one search; a wider sketch than the one here may "
        "recover part of the gap.",
    ),
}


def _verdict(entry: dict) -> str:
    low, high = entry["ci95"]
    if low > 0:
        return "holds"
    if high < 0:
        return "reversed"
    return "not resolved (the interval includes 0)"


def _difference(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"


def _chosen(row: dict) -> str:
    if row["parameter"] is None:
        return "-"
    values = [cell["value"] for cell in row["cells"]]
    return f"{row['parameter']} {row['chosen']:g} (of {min(values):g}-{max(values):g})"


def _edge_note(rows: list[dict]) -> str:
    edges = [
        f"{row['method']} ({row['variant'].split(' (')[0]})"
        for row in rows
        if len(row["cells"]) > 1 and row["chosen"] in (row["cells"][0]["value"], row["cells"][-1]["value"])
    ]
    if not edges:
        return "Every grid's dev choice lies inside it."
    return (
        "At the edge of its grid (its optimum may lie beyond): " + ", ".join(edges) + ". The ridge grids "
        "extend themselves up to 1e-5 and 3000; EK-FAC's damping needs a new gradient pass per value."
    )


def _paper_paragraph(paper: str, claims: list[dict]) -> str:
    title, text = PAPERS[paper]
    found = [
        f"{claim['claim']}: held-out {_difference(claim['heldout'])}, {_verdict(claim['heldout'])}; "
        f"per-step {_difference(claim['step_trajectory'])}, {_verdict(claim['step_trajectory'])}"
        for claim in claims
        if claim["paper"] == paper
    ]
    return para(f"**{title}** {text} Here (test split, paired): " + "; ".join(found) + ".")


@page(
    "docs/benchmarks/methods.md",
    "Attribution methods on the shipped model",
    "LDS of TRAK, D-TRAK, Journey-TRAK, DAS, TracIn, ReTrac and EK-FAC influence on one benchmark; claims",
    METHODS,
)
def methods() -> str:
    result = load(METHODS)["cases"]["shipped_model"]
    rows, history = result["rows"], result["history"]
    body = [
        [
            row["method"],
            f"arXiv {row['paper']}" if row["paper"] else "-",
            row["variant"],
            _chosen(row),
            interval(row["test"]["heldout"]),
            interval(row["test"]["generated"]),
            interval(row["test"]["step_trajectory"]),
            f"`{row['index']}`" if row["index"] else "-",
        ]
        for row in rows
    ]
    grids = [
        f"{row['method']}, {row['variant'].split(' (')[0]}: "
        + ", ".join(f"{cell['value']:g} {cell['dev_heldout']:.3f}" for cell in row["cells"])
        for row in rows
        if len(row["cells"]) > 1
    ]
    claims = [
        [
            f"arXiv {claim['paper']}",
            claim["claim"],
            _difference(claim["heldout"]),
            _verdict(claim["heldout"]),
            _difference(claim["step_trajectory"]),
            _verdict(claim["step_trajectory"]),
        ]
        for claim in result["claims"]
    ]
    return "\n\n".join(
        [
            para("""Every method the explorer serves, scored on one benchmark: the [LDS of the shipped
            model](lds_mnist5k.md) (its ground truth: subset models retrained from the shipped recipe),
            through the index files the explorer reads. Each method's hyper-parameter is chosen on the
            dev split by held-out LDS (its grid is extended while the choice sits at an edge) and
            reported on the test split, with 95% bootstrap intervals over subset models and queries.
            Whole image: held-out digits and generated finals, scored at every bucket. Per step: the
            query the explorer builds at a sampler step (Journey-TRAK's), against the subset models'
            loss at the trajectory's own x_t. Every index is int8, like the served one."""),
            commands(result["command"] + f" --json bench/results/{METHODS}"),
            table(
                [
                    "method",
                    "paper",
                    "variant",
                    "chosen on dev",
                    "test held-out LDS",
                    "test generated LDS",
                    "test per-step LDS",
                    "index",
                ],
                body,
            ),
            para(f"""How each is built: TRAK and D-TRAK `featurize --output loss|mean`; DAS `featurize
            --method das` (its stored rows are loss gradients J_i^T r_i, its kernel and queries the
            `mean` output's: the linearized change of the output under the Newton step); DAS's released
            code instead scales D-TRAK `mean` rows by the residual norm (`--das-weights`); TracIn
            `featurize --method tracin --checkpoints`, and ReTrac from its kept features by `reindex
            --as-retrac` (what `featurize --method retrac` computes, tested), over the checkpoints at steps
            {", ".join(map(str, history["checkpoint_steps"]))} of a rerun of the shipped model's
            training recipe (runs/shipped-history: the shipped model kept no checkpoints, and the
            rerun's final EMA weights differ from the shipped ones by at most
            {100 * history["final_ema_max_relative_difference"]:.2f}% relative per tensor), each
            sketched to {history["checkpoint_dim"]} dimensions; EK-FAC `featurize --method ekfac`
            (factors fitted on {history["ekfac_fit_images"]} training images, both sides
            preconditioned, then sketched to {history["ekfac_dim"]} dimensions: preconditioned
            gradients are nearly orthogonal and need a wider sketch than whitened ones)."""),
            para("Dev held-out LDS over each grid: " + "; ".join(grids) + ". " + _edge_note(rows)),
            table(
                ["paper", "claim (first minus second)", "held-out", "", "per-step", ""],
                claims,
            ),
            *[_paper_paragraph(paper, result["claims"]) for paper in PAPERS],
            f"Results: {source_links([METHODS])}.",
        ]
    )
