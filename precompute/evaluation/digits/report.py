"""Markdown tables and a plot of the evaluation results (the JSON written by `evaluate lds` /
`counterfactual`), and the files a digits LDS run is saved to."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from explorer.atomic import write_atomic, write_json_atomic
from precompute.evaluation.digits.config import LDSRun
from precompute.evaluation.metrics import spearman_columns

GROUPS = ("all", "heldout", "generated", "journey")


def _cell(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}]"


def lds_markdown(results: dict) -> str:
    """The LDS table (mean and 95% bootstrap CI over subsets), then the claims and the ablations."""
    lines = _methods_lines(results) + _claims_lines(results)
    if results.get("ablations"):
        lines += _ablation_lines(results)
    if results.get("lambda_sweep"):
        lines += _sweep_lines(results["lambda_sweep"]) + _validated_lines(results["lambda_sweep"])
    if results.get("defaults"):
        lines += ["", defaults_markdown(results["defaults"])]
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items())
    lines += ["", f"wall times: {timings}"]
    return "\n".join(lines)


def _methods_lines(results: dict) -> list[str]:
    """Every method by its LDS over all queries, per query group, with distinctness and the sign check."""
    q = results["queries"]
    header = (
        "| method | "
        + " | ".join(f"{g} ({q[g]})" for g in GROUPS)
        + " | distinct top-10 (heldout / journey) | sign check |"
    )
    lines = [
        f"LDS on digits: {results['subsets']} subset models of {results['train_size'] // 2} images "
        f"(alpha 0.5 of {results['train_size']}); mean over queries [95% bootstrap CI over subsets]",
        "",
        header,
        "|---|" + "---|" * (len(GROUPS) + 2),
    ]
    order = sorted(results["methods"], key=lambda m: -results["methods"][m]["lds"]["all"]["mean"])
    for name in order:
        method = results["methods"][name]
        distinct = method["distinctness"]
        sign = method["sign_check"]
        lines.append(
            f"| {name}: {method['label']} | "
            + " | ".join(_cell(method["lds"][g]) for g in GROUPS)
            + f" | {distinct['heldout']:.2f} / {distinct['journey']:.2f} | {sign['top50_positive']:+.2f} |"
        )
    return lines


def _claims_lines(results: dict) -> list[str]:
    """The paired differences between methods (the papers' claims)."""
    lines = [
        "",
        "Claims (paired bootstrap over subsets):",
        "",
        "| difference | " + " | ".join(GROUPS) + " |",
        "|---|" + "---|" * len(GROUPS),
    ]
    for name, entry in results["claims"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(entry[g]) for g in GROUPS) + " |")
    return lines


def _ablation_lines(results: dict) -> list[str]:
    """The best method with one setting changed at a time."""
    lines = [
        "",
        f"Ablations of {results['best_method']} (one setting changed; difference from it):",
        "",
        "| variant | " + " | ".join(GROUPS) + " | journey minus base |",
        "|---|" + "---|" * (len(GROUPS) + 1),
    ]
    for name, entry in results["ablations"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(_cell(entry["lds"][g]) for g in GROUPS)
            + f" | {_cell(entry['minus_base']['journey'])} |"
        )
    return lines


def _sweep_lines(sweep: dict) -> list[str]:
    """The lambda sweep picked on the benchmark itself (a diagnostic), raw and ReTrac-normalized."""
    lines = [
        "",
        "Lambda sweep (diagnostic: lambda picked on the benchmark itself; 'inf' = no whitening, "
        "i.e. gradient dot / cosine); mean LDS, raw | ReTrac-normalized:",
        "",
        "| output | relative lambda | heldout | generated | journey | heldout (norm) | generated "
        "(norm) | journey (norm) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def order(label: str) -> tuple[int, float]:
        return (0, 0.0) if label == "gcv" else (2, 0.0) if label == "inf" else (1, float(label))

    for output, entry in sweep.items():
        for label in sorted((k for k in entry if k != "validated"), key=order):
            values = entry[label]
            if label == "gcv":
                label = "GCV (" + ", ".join(f"{v:.2g}" for v in values["relative_lambda"].values()) + ")"
            cells = [
                f"{values[kind][g]:.3f}"
                for kind in ("raw", "norm")
                for g in ("heldout", "generated", "journey")
            ]
            lines.append(f"| {output} | {label} | " + " | ".join(cells) + " |")
    return lines


def _validated_lines(sweep: dict) -> list[str]:
    """The lambda chosen fairly (dev half) against GCV, on the test half."""
    lines = [
        "",
        "Lambda validated fairly (picked on half of the queries with the even subset models, "
        "reported on the "
        "other queries with the odd ones) vs GCV on the same test half; mean LDS:",
        "",
        "| output | normalization | chosen lambda | heldout | generated | journey | GCV: heldout | "
        "generated | journey |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for output, entry in sweep.items():
        for name, values in entry["validated"].items():
            cells = [
                f"{values[key][g]:.3f}"
                for key in ("test", "gcv_test")
                for g in ("heldout", "generated", "journey")
            ]
            lines.append(f"| {output} | {name} | {values['chosen']} | " + " | ".join(cells) + " |")
    return lines


def _lambda_order(label: str) -> float:
    return -1.0 if label == "gcv" else float(label)


def defaults_markdown(defaults: dict) -> str:
    """The tables of the shipped-default study (precompute/evaluation/digits/defaults.py)."""
    config = defaults["config"]
    lines = [
        f"Shipped-default study: count-sketch features folded from k = {config['folded_from_k']}; "
        "lambda relative "
        "to the mean eigenvalue of Phi^T Phi; mean LDS [95% bootstrap CI over all subset models]; last "
        "column: "
        f"minus the same row at lambda {config['reference']:g} (paired)",
        "",
        "| method | k | lambda | " + " | ".join(GROUPS) + f" | all minus lambda {config['reference']:g} |",
        "|---|---|---|" + "---|" * (len(GROUPS) + 1),
    ]
    plain = {key: row for key, row in defaults["rows"].items() if "storage" not in row}
    order = sorted(
        plain,
        key=lambda key: (
            plain[key]["output"] != config["output"],
            plain[key]["output"],
            plain[key]["k"],
            not plain[key]["normalize"],
            _lambda_order(plain[key]["lambda"]),
        ),
    )
    for key in order:
        row = plain[key]
        label = row["lambda"]
        if label == "gcv":
            label = "GCV (" + ", ".join(f"{v:.2g}" for v in row["relative_lambda"].values()) + ")"
        minus = _cell(row["minus_reference"]["all"]) if "minus_reference" in row else "-"
        lines.append(
            f"| {key.split('@')[0]} | {row['k']} | {label} | "
            + " | ".join(_cell(row["lds"][g]) for g in GROUPS)
            + f" | {minus} |"
        )
    lines += [
        "",
        "Fair protocol: lambda (GCV or fixed) picked on half of the queries with the even subset models; "
        "LDS on the other queries with the odd models [95% CI over the odd models]:",
        "",
        "| method | k | chosen lambda (pick LDS) | " + " | ".join(GROUPS) + " | GCV: all | lambda "
        f"{config['reference']:g}: all |",
        "|---|---|---|" + "---|" * (len(GROUPS) + 2),
    ]
    reference = f"{config['reference']:g}"
    for family, entry in defaults["fair"].items():
        chosen = entry["chosen"]
        test = entry["test"][chosen]
        lines.append(
            f"| {family.split('@')[0]} | {entry['k']} | {chosen} ({entry['pick_lds'][chosen]:.3f}) | "
            + " | ".join(_cell(test[g]) for g in GROUPS)
            + f" | {_cell(entry['test']['gcv']['all'])} | "
            + (f"{_cell(entry['test'][reference]['all'])} |" if reference in entry["test"] else "- |")
        )
    lines += [
        "",
        "Paired differences on the whole benchmark at the fairly chosen lambdas:",
        "",
        "| difference | " + " | ".join(GROUPS) + " |",
        "|---|" + "---|" * len(GROUPS),
    ]
    for name, entry in defaults["differences"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(entry[g]) for g in GROUPS) + " |")
    stored = {key: row for key, row in defaults["rows"].items() if "storage" in row}
    if stored:
        lines += [
            "",
            "Stored-vector precision (FAISS scalar quantizer on the normalized training rows; queries "
            "float32):",
            "",
            "| method | k | lambda | storage | all | heldout | journey | all minus float32 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key, row in stored.items():
            lines.append(
                f"| {key.split('@')[0]} | {row['k']} | {row['lambda']} | {row['storage']} | "
                + " | ".join(_cell(row["lds"][g]) for g in ("all", "heldout", "journey"))
                + f" | {_cell(row['minus_float32']['all'])} |"
            )
    return "\n".join(lines)


def lds_plot(results: dict, path: str | Path) -> Path | None:
    """A horizontal bar chart of LDS per method and query kind with CI whiskers (PNG); None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import numpy as np

    methods = sorted(results["methods"], key=lambda m: results["methods"][m]["lds"]["all"]["mean"])
    kinds = ("heldout", "generated", "journey")
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(methods) + 1.2))
    y = np.arange(len(methods))
    for offset, kind in zip((-0.27, 0.0, 0.27), kinds):
        entries = [results["methods"][m]["lds"][kind] for m in methods]
        means = np.array([e["mean"] for e in entries])
        errors = np.array([[e["mean"] - e["ci95"][0], e["ci95"][1] - e["mean"]] for e in entries]).T
        ax.barh(
            y + offset,
            means,
            height=0.26,
            xerr=errors,
            label=f"{kind} ({results['queries'][kind]})",
            capsize=2,
        )
    ax.set_yticks(y, methods, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("LDS (Spearman over subset models), mean over queries, 95% bootstrap CI")
    ax.set_title(f"digits LDS, {results['subsets']} subsets, alpha 0.5")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_run(run: LDSRun, results_dir: str | Path, cache: str | Path, name: str = "lds_digits") -> list[Path]:
    """Small results to results_dir (JSON; Markdown tables; NPZ: masks, truth, the queries, per-query LDS
    of every
    method), a PNG plot; the score matrices tau (Q x N per method) and predictions g (M x Q) to the cache."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path, npz_path = results_dir / f"{name}.json", results_dir / f"{name}.npz"
    write_json_atomic(json_path, run.results)
    markdown_path = results_dir / f"{name}.md"
    write_atomic(markdown_path, lambda tmp: Path(tmp).write_text(lds_markdown(run.results) + "\n"))
    queries = run.queries.to_arrays()
    arrays = {
        "masks_packed": np.packbits(run.masks, axis=1),
        "masks_shape": np.array(run.masks.shape),
        "truth": run.truth.astype(np.float32),
        **queries,
        "query_images": queries["query_images"].astype(np.float16),
    }
    names = sorted(run.predictions)
    arrays["method_names"] = np.array(names)
    arrays["lds_per_query"] = np.stack(
        [spearman_columns(run.truth, run.predictions[m]) for m in names]
    )  # (methods, Q)
    predictions_by_method = {name: g.astype(np.float32) for name, g in run.predictions.items()}
    for path, payload in (
        (npz_path, arrays),
        (Path(cache) / "scores.npz", run.scores),
        (Path(cache) / "predictions.npz", predictions_by_method),
    ):
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **payload)
        tmp.replace(path)
    plot = lds_plot(run.results, results_dir / f"{name}.png")
    return [json_path, npz_path, markdown_path] + ([plot] if plot is not None else [])
