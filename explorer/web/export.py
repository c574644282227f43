"""Export of the view on screen: the current step's influencers as JSON, CSV and a PNG figure, and the link
that reproduces the view (?seed=S&steps=N&step=s&top_k=k on the page's URL)."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
from PIL import Image, ImageDraw

from explorer.attribution import TrajectoryAttribution
from explorer.data import to_uint8
from explorer.index import AttributionIndex
from explorer.web.rows import influencer_rows

TILE = 64  # pixels per image in the PNG figure
CAPTION = 24  # caption band under each tile
TITLE = 24  # the title band: seed, step, t, method
LABEL = 84  # the row labels' column


def view_query(attribution: TrajectoryAttribution, step: int, top_k: int) -> str:
    """The query string of the page URL that regenerates this trajectory and shows this step."""
    trajectory = attribution.trajectory
    fields = {"seed": trajectory.seed, "steps": trajectory.steps, "step": step, "top_k": top_k}
    if trajectory.prompt is not None:  # a text model's
        fields.update(prompt=trajectory.prompt, guidance=trajectory.guidance)
    return "?" + urlencode(fields)


def file_row(row: dict) -> dict:
    """A row as the files and the API give it: no index position, the percentile to 2 decimals."""
    return {
        key: round(value, 2) if key == "percentile" else value for key, value in row.items() if key != "row"
    }


def export_step(
    attribution: TrajectoryAttribution,
    index: AttributionIndex,
    step: int,
    top_k: int,
    directory: Path | None = None,
) -> list[Path]:
    """Write influencers_<seed>_<step>.json / .csv / .png into a fresh folder; returns their paths."""
    directory = Path(directory or tempfile.mkdtemp(prefix="explorer-export-"))
    directory.mkdir(parents=True, exist_ok=True)
    current, trajectory = attribution.steps[step], attribution.trajectory
    rows = [
        {
            key: (round(value, 2) if key == "percentile" else value)
            for key, value in row.items()
            if key != "row"
        }
        for row in influencer_rows(index, current)
    ]
    stem = f"influencers_seed{trajectory.seed}_step{step}"
    document = {
        "seed": trajectory.seed,
        "steps": trajectory.steps,
        "step": step,
        "timestep": current.timestep,
        "bucket": current.bucket,
        "index": attribution.index_name,
        "score": index.score_name,
        "view": view_query(attribution, step, top_k),
        "influencers": [
            {**row, "image": index.train_images[_position(index, row["id"])].tolist()} for row in rows
        ],
    }
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps(document))
    csv_path = directory / f"{stem}.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png_path = directory / f"{stem}.png"
    figure(attribution, index, step, rows).save(png_path)
    return [json_path, csv_path, png_path]


def _position(index: AttributionIndex, train_id: int) -> int:
    return int(np.flatnonzero(index.train_ids == train_id)[0])


def figure(
    attribution: TrajectoryAttribution, index: AttributionIndex, step: int, rows: list[dict]
) -> Image.Image:
    """A title (seed, step, t, method), then x_t and x0hat of the step, one row of positive and one of
    negative influencers, each row labelled on the left and each tile captioned."""
    trajectory, current = attribution.trajectory, attribution.steps[step]
    columns = max(2, max(r["rank"] for r in rows))
    row_height = TILE + CAPTION
    width, height = LABEL + columns * TILE, TITLE + 3 * row_height
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    title = (
        f"seed {trajectory.seed} · step {step} of {trajectory.steps - 1} · t = {current.timestep} · "
        f"bucket {current.bucket} · {attribution.index_name} ({index.score_name})"
    )
    draw.text((4, 6), title, fill="black")
    for row, label in enumerate(("x_t, x0hat", "positive", "negative")):
        draw.text((4, TITLE + row * row_height + TILE // 2 - 6), label, fill="black")

    def tile(image: np.ndarray, column: int, row: int, caption: str) -> None:
        picture = Image.fromarray(image).convert("RGB").resize((TILE, TILE), Image.NEAREST)
        left, top = LABEL + column * TILE, TITLE + row * row_height
        canvas.paste(picture, (left, top))
        draw.text((left + 2, top + TILE + 2), caption, fill="black")

    xt, x0hat, _ = trajectory.pictures  # a latent model's decoded
    frames = to_uint8(np.stack([xt[step].numpy(), x0hat[step].numpy()]))
    tile(frames[0], 0, 0, f"x_t t={current.timestep}")
    tile(frames[1], 1, 0, "x0hat")
    for r in rows:
        image = index.train_images[_position(index, r["id"])]
        tile(image, r["rank"] - 1, 1 if r["sign"] == "positive" else 2, f"{r['label']} {r['score']:+.2f}")
    return canvas


def link_arguments(query: dict) -> dict | None:
    """What a page opened with a view's query string (?seed=S&steps=N&step=s&top_k=k, a text model's
    &prompt=..&guidance=..) asks Generate for; None for a plain page load (no seed). Generate checks or clamps
    the values."""
    if "seed" not in query:
        return None
    values = {key: _link_value(value) for key, value in query.items()}
    return dict(
        seed=values["seed"],
        steps=values.get("steps", 50),
        top_k=values.get("top_k", 8),
        prompt=query.get("prompt"),  # text as it is, even where it reads as a number
        guidance=values.get("guidance", 1.0),
        step=values.get("step"),
    )


def _link_value(text: str):
    """A query-string value as a number where it is one; otherwise the text, for the refusal to name."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text
