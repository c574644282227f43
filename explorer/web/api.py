"""The documented endpoint for scripts: `/attribute_trajectory` returns one generation's attribution as JSON.

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    result = client.predict(3, 50, 8, "", "", 1.0, 16, api_name="/attribute_trajectory")
    result["steps"][20]["positive"][0]  # {'sign': 'positive', 'rank': 1, 'id': ..., 'score': ...}

Per step: t, the index bucket, the positive and negative influencers (the rows the page captions and Export
writes: id, label or a text model's caption, score, percentile, kind), the classifier's p(class | x0hat), and
for the whole trajectory the completions' p(class | x_t) with their standard errors. The same seed gives the
same trajectory as the page (the sampler is seeded), so its ids and scores are the page's.
"""

from __future__ import annotations

import time

from explorer.attribution import Explorer, check_top_k
from explorer.errors import ExplorerError, whole_number
from explorer.web.export import file_row
from explorer.web.rows import influencer_rows

MAX_COMPLETIONS = 64
ROLLOUT_STEPS = 12  # start steps of the completions, as the page's curves


def attribute_trajectory(
    explorer: Explorer,
    seed,
    steps=50,
    top_k=8,
    method: str | None = None,
    prompt: str | None = None,
    guidance=1.0,
    completions=16,
) -> dict:
    """Sample with `seed`, attribute every step with `method` (an index name; "" or None: the first one), and
    with `completions` > 0 estimate p(class | x_t) from that many completions at 12 start steps."""
    top_k = check_top_k(top_k)
    completions = whole_number(completions, "completions", 0, MAX_COMPLETIONS)
    name, index = explorer.index(method or None)
    attribution = explorer.generate(seed, steps, name, top_k, prompt=prompt or None, guidance=guidance)
    trajectory = attribution.trajectory
    curves = None
    if completions and explorer.classifier is not None:
        started = time.perf_counter()
        rollouts = explorer.rollouts(trajectory, ROLLOUT_STEPS, completions)
        attribution.timings["completions_s"] = time.perf_counter() - started
        curves = {
            "steps": rollouts.steps.tolist(),
            "t": trajectory.timesteps[rollouts.steps].tolist(),
            "p": rollouts.probabilities.round(4).tolist(),
            "stderr": rollouts.stderr.round(4).tolist(),
            "completions": completions,
        }
    elif completions:
        raise ExplorerError("completions need a feature classifier and this app has none: pass completions=0")
    rows = [[file_row(row) for row in influencer_rows(index, step)] for step in attribution.steps]
    return {
        "seed": trajectory.seed,
        "steps": [
            {
                "step": s,
                "t": step.timestep,
                "bucket": step.bucket,
                "positive": [row for row in rows[s] if row["sign"] == "positive"],
                "negative": [row for row in rows[s] if row["sign"] == "negative"],
                "negative_count": step.negative_count,
                "x0hat_p": attribution.proxy[s].round(4).tolist(),
            }
            for s, step in enumerate(attribution.steps)
        ],
        "method": name,
        "score": index.score_name,
        "classes": explorer.class_names,
        "completions": curves,
        "prompt": trajectory.prompt,
        "guidance": trajectory.guidance,
        "timings_s": {key: round(value, 3) for key, value in attribution.timings.items()},
    }
