"""Export of the view on screen: the current step's influencers as JSON, CSV and a PNG figure, and the link
that reproduces the view (?seed=S&steps=N&step=s&top_k=k on the page's URL)."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from urllib.parse import urlencode

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from explorer.attribution import StepAttribution, TrajectoryAttribution
from explorer.data import to_uint8
from explorer.errors import ExplorerError, whole_number
from explorer.index import AttributionIndex
from explorer.web.payloads import refused

TILE = 64  # pixels per image in the PNG figure
CAPTION = 24  # caption band under each tile


def view_query(attribution: TrajectoryAttribution, step: int, top_k: int) -> str:
    """The query string of the page URL that regenerates this trajectory and shows this step."""
    trajectory = attribution.trajectory
    fields = {"seed": trajectory.seed, "steps": trajectory.steps, "step": step, "top_k": top_k}
    if trajectory.prompt is not None:  # a text model's
        fields.update(prompt=trajectory.prompt, guidance=trajectory.guidance)
    return "?" + urlencode(fields)


def step_rows(index: AttributionIndex, step: StepAttribution) -> list[dict]:
    """One row per listed influencer: sign, rank, id, label, score, percentile, negative or least aligned."""
    rows = []
    for sign, result in (("positive", step.positive), ("negative", step.negative)):
        for rank, (position, score) in enumerate(zip(result.positions, result.scores), start=1):
            position = int(position)
            kind = sign if sign == "positive" or score < 0 else "least aligned"
            rows.append(
                {
                    "sign": sign,
                    "rank": rank,
                    "id": int(index.train_ids[position]),
                    "label": index.class_names[int(index.train_labels[position])],
                    "score": float(score),
                    "percentile": round(float(step.percentile(position)), 2),
                    "kind": kind,
                }
            )
    return rows


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
    rows = step_rows(index, current)
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
    """x_t and x0hat of the step, then one row of positive and one of negative influencers, captioned."""
    trajectory = attribution.trajectory
    columns = max(2, max(r["rank"] for r in rows))
    canvas = Image.new("RGB", (columns * TILE, 3 * (TILE + CAPTION)), "white")
    draw = ImageDraw.Draw(canvas)

    def tile(image: np.ndarray, column: int, row: int, caption: str) -> None:
        picture = Image.fromarray(image).convert("RGB").resize((TILE, TILE), Image.NEAREST)
        canvas.paste(picture, (column * TILE, row * (TILE + CAPTION)))
        draw.text((column * TILE + 2, row * (TILE + CAPTION) + TILE + 2), caption, fill="black")

    xt, x0hat, _ = trajectory.pictures  # a latent model's decoded
    frames = to_uint8(np.stack([xt[step].numpy(), x0hat[step].numpy()]))
    tile(frames[0], 0, 0, f"x_t t={attribution.steps[step].timestep}")
    tile(frames[1], 1, 0, "x0hat")
    for r in rows:
        image = index.train_images[_position(index, r["id"])]
        tile(image, r["rank"] - 1, 1 if r["sign"] == "positive" else 2, f"{r['label']} {r['score']:+.2f}")
    return canvas


def open_view(handlers, query: dict) -> tuple:
    """Outputs of a page opened with a view's query string: seed, steps, then generate's outputs with the
    linked step on screen; a plain page load (no seed) changes nothing, a bad value goes to the status
    line."""
    prompt = query.get("prompt")  # text as it is, even where it reads as a number
    query = {key: _link_value(value) for key, value in query.items()}
    if "seed" not in query:
        return (gr.skip(),) * 19
    steps, top_k, guidance = query.get("steps", 50), query.get("top_k", 8), query.get("guidance", 1.0)
    quiet = lambda *a, **k: None  # noqa: E731
    outputs = list(handlers.generate(query["seed"], steps, top_k, None, prompt, guidance, progress=quiet))
    session = outputs[0]
    if not hasattr(session, "attribution"):  # refused: generate's status slot says why
        return (gr.skip(),) * 4 + tuple(outputs)
    trajectory = session.attribution.trajectory
    if "step" in query:
        try:
            step = whole_number(query["step"], "step", 0, trajectory.steps - 1)
            outputs[3:10] = handlers.step_view(session, step)
            outputs[3] = gr.update(maximum=trajectory.steps - 1, value=step, label=outputs[3]["label"])
        except ExplorerError as error:
            outputs[10] = refused(error)
    shown = (trajectory.prompt, trajectory.guidance) if trajectory.prompt is not None else (gr.skip(),) * 2
    return (trajectory.seed, trajectory.steps, *shown, *outputs)


def _link_value(text: str):
    """A query-string value as a number where it is one; otherwise the text, for the refusal to name."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text
