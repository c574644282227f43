"""A step's influencers as rows: what the page captions, Export writes and /attribute_trajectory returns.

Every view of a step's lists goes through `influencer_rows`, so the page, the files and the API agree.
"""

from __future__ import annotations

from explorer.attribution import StepAttribution
from explorer.index import AttributionIndex


def training_row(
    index: AttributionIndex, step: StepAttribution, position: int, score: float, sign: str
) -> dict:
    """One training image at one step: sign, id, label (a text model's caption too), score, its percentile
    among all training rows, kind (a listed negative with a score >= 0 is only "least aligned"), and `row`,
    its position in the index (for thumbnails; the files and the API leave it out)."""
    row = {
        "sign": sign,
        "id": int(index.train_ids[position]),
        "label": index.class_names[int(index.train_labels[position])],
        "score": float(score),
        "percentile": float(step.percentile(position)),
        "kind": sign if sign == "positive" or score < 0 else "least aligned",
        "row": int(position),
    }
    if index.train_captions is not None:
        row["caption"] = index.train_captions[position]
    return row


def influencer_rows(index: AttributionIndex, step: StepAttribution) -> list[dict]:
    """A step's listed influencers as training_row dicts with their rank, positives first."""
    return [
        {"rank": rank, **training_row(index, step, int(position), float(score), sign)}
        for sign, result in (("positive", step.positive), ("negative", step.negative))
        for rank, (position, score) in enumerate(zip(result.positions, result.scores), start=1)
    ]


def caption(row: dict, score_name: str) -> str:
    """'[least aligned · ]id I · label L · cos +0.123 · p99.1' (a text model: its prompt, not the label).

    score_name is the index's: "cos" for a normalized index (the cosine of the whitened gradients), else
    "TRAK score"."""
    prefix = "least aligned · " if row["kind"] == "least aligned" else ""
    name = row["caption"] if "caption" in row else f"label {row['label']}"
    return f"{prefix}id {row['id']} · {name} · {score_name} {row['score']:+.3f} · p{row['percentile']:.1f}"
