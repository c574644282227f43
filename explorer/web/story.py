"""What each step says in words and in one number per class: the noise level, where the completions from x_t
stand, and which classes the top influencers come from.

On generated digits the top influencers share the final digit's class about as often as the completions from
x_t already name it (issue 33: 9% at t >= 800, 60% near t = 300, 85% at t <= 180), so the share of the top-k
in each class at every step shows when the digit is decided and who decided it, without scrubbing.
"""

from __future__ import annotations

import numpy as np

from explorer.attribution import TrajectoryAttribution
from explorer.index import AttributionIndex
from explorer.likelihood import RolloutCurves

HIGH_NOISE, LOW_NOISE = 0.35, 0.8  # sqrt(abar_t), the share of x0 in x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
SPREAD, AGREE = 0.5, 0.9  # the completions' top class probability: below SPREAD "spread", from AGREE "agree"


def class_shares(attribution: TrajectoryAttribution, index: AttributionIndex) -> np.ndarray:
    """(S, classes of the index): the share of each step's top-k positive influencers in each class."""
    classes = len(index.class_names)
    shares = np.zeros((len(attribution.steps), classes))
    for s, step in enumerate(attribution.steps):
        labels = index.train_labels[step.positive.positions]
        shares[s] = np.bincount(labels, minlength=classes)[:classes] / max(1, len(labels))
    return shares


def completions_at(rollouts: RolloutCurves, steps: int) -> np.ndarray:
    """(S, classes): the completions' p(class | x_t) at every step, linear between the steps they started
    from."""
    every = np.arange(steps)
    return np.stack(
        [
            np.interp(every, rollouts.steps, rollouts.probabilities[:, c])
            for c in range(rollouts.probabilities.shape[1])
        ],
        axis=1,
    )


def noise_words(signal: float) -> str:
    """signal = sqrt(abar_t): 'high noise', 'medium noise' or 'low noise' with the share of signal in x_t."""
    level = "high" if signal < HIGH_NOISE else "low" if signal >= LOW_NOISE else "medium"
    return f"{level} noise (x_t is {100 * signal:.0f}% signal)"


def completion_words(p: np.ndarray, class_names: list[str]) -> str:
    """Where the completions from x_t stand, from their p(class | x_t) (classes,)."""
    top = int(p.argmax())
    name, value = class_names[top], float(p[top])
    if value < SPREAD:
        return f"the completions are still spread over classes (top: {name}, p = {value:.2f})"
    if value < AGREE:
        return f"the completions lean to {name} (p = {value:.2f})"
    return f"the completions agree on {name} (p = {value:.2f})"


def step_notes(
    attribution: TrajectoryAttribution,
    index: AttributionIndex,
    abar: np.ndarray,
    class_names: list[str],
    rollouts: RolloutCurves | None,
) -> list[str]:
    """One line per step, e.g. 't = 880: high noise (x_t is 9% signal); the completions are still spread over
    classes (top: 4, p = 0.31); 1 of 8 top influencers is labelled 7, the final image's class'.

    abar: (T,) the training schedule's alphas_cumprod; class_names: the likelihood's classes (none: no
    classifier)."""
    steps = attribution.steps
    final = class_names[int(attribution.proxy[-1].argmax())] if class_names else None
    curves = None if rollouts is None else completions_at(rollouts, len(steps))
    shares = class_shares(attribution, index)
    notes = []
    for s, step in enumerate(steps):
        parts = [f"t = {step.timestep}: {noise_words(float(np.sqrt(abar[step.timestep])))}"]
        if curves is not None:
            parts.append(completion_words(curves[s], class_names))
        elif class_names:
            parts.append("the completions from x_t are being computed")
        if final is not None and final in index.class_names:
            k = len(step.positive.positions)
            share = int(round(shares[s, index.class_names.index(final)] * k))
            verb = "is" if share == 1 else "are"
            parts.append(f"{share} of {k} top influencers {verb} labelled {final}, the final image's class")
        notes.append("; ".join(parts))
    return notes
