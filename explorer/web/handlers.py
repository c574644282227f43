"""The web UI's event handlers and per-session state (the layout and wiring are in ui.py).

Every handler is a few lines around one engine call. All steps are attributed at generate
time, so moving the step slider only reads the session's state (no gradients). Each browser
session keeps its own `Session` in a gr.State; sessions never see each other's trajectory.

Handlers return their outputs already serialized (events use postprocess=False), with images
inlined as base64 PNG data URIs (`ImageData.url`, which gradio documents as "publicly available
url or base64 encoded image"). The images are under a kilobyte each; as files, gradio would
write, path-check and serve every gallery image of every slider update separately.
"""

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import gradio.utils as gr_utils
import numpy as np

from explorer.attribution import Explorer, StepAttribution, TrajectoryAttribution
from explorer.data import load_image_file
from explorer.errors import ExplorerError, bounded, whole_number
from explorer.index import AttributionIndex, SearchResult
from explorer.likelihood import RolloutCurves
from explorer.memory import releases_memory
from explorer.sampler import MAX_SEED
from explorer.web import compare, export, plots
from explorer.web.insight import InsightHandlers
from explorer.web.payloads import gallery_payload, image_payload, plot_payload, user_errors
from explorer.web.region import RegionHandlers

logger = logging.getLogger(__name__)

IMAGE_PX = plots.IMAGE_PX
THUMB_PX = 112  # influencer thumbnails
LARGE_PX = 224  # the selected influencer
STRIP_COUNT = 10  # x_t thumbnails along the trajectory
ROLLOUT_STEPS, ROLLOUT_COMPLETIONS = 12, 16  # rollout curves: 16 completions at 12 steps
NO_INFLUENCER = "Click an influencer to see when it mattered."
UI_MAX_TOP_K = 32  # top-k the page offers (the engine allows MAX_TOP_K); a larger typed value is clamped


@dataclass(eq=False)
class Session:
    """One browser session's generation: every step's attribution, later the rollout curves."""

    attribution: TrajectoryAttribution
    plot: dict  # the likelihood figure as JSON (plots.figure_template); scrubbing only moves its marker
    step: int  # the step on screen
    rollouts: RolloutCurves | None = None
    rollout_s: float | None = None
    selected: tuple[str, int] | None = None  # the clicked influencer: (sign, training row); follows the step
    notes: tuple[str, ...] = ()  # what the controls' values were changed to (e.g. a clamped top-k)
    compare: TrajectoryAttribution | None = None  # the same trajectory under a second index (compare.py)
    region: tuple | None = None  # (box, the trajectory attributed inside it) (region.py)
    region_corner: tuple[int, int] | None = None  # the first clicked corner of a box being drawn

    @property
    def strip_steps(self) -> list[int]:
        """The steps shown in the trajectory strip, noisiest first."""
        last = self.attribution.trajectory.steps - 1
        return sorted(set(np.linspace(0, last, min(STRIP_COUNT, last + 1)).round().astype(int).tolist()))

    def status(self) -> str:
        a, t = self.attribution, self.attribution.timings
        parts = [
            f"seed {a.trajectory.seed} · {a.trajectory.steps} steps · {a.index_name}",
            f"sample {t['sample_s']:.2f} s · attribute {t['attribute_s']:.2f} s · proxy {t['proxy_s']:.2f} s",
        ]
        if a.proxy.shape[1] == 0:
            parts.append("no likelihood curves: no feature classifier")
        elif self.rollouts is None:
            parts.append("rollout curves: computing…")
        else:
            parts.append(
                f"rollouts ({len(self.rollouts.steps)} steps × {self.rollouts.completions} completions) "
                f"{self.rollout_s:.1f} s"
            )
        return " · ".join([*parts, *self.notes])


class Handlers(RegionHandlers, InsightHandlers):
    """The event handlers, bound to one Explorer (shared, read-only) and given per-session state; the region
    and the bias & memorization views' handlers live with those views."""

    def __init__(self, explorer: Explorer):
        self.explorer = explorer
        self._bias, self._copies = {}, {}  # per index: explorer.web.insight's cached computations
        self._thumbnails: dict[tuple[int, int], str] = {}  # (id(index), row) -> data URI, for all sessions

    # -- helpers ---------------------------------------------------------------------------
    def _index(self, name: str | None) -> AttributionIndex:
        return self.explorer.index(name)[1]

    def _thumbnail(self, index: AttributionIndex, position: int) -> str:
        key = (id(index), position)
        if key not in self._thumbnails:
            self._thumbnails[key] = plots.png_data_uri(plots.upscale(index.train_images[position], THUMB_PX))
        return self._thumbnails[key]

    def _caption(
        self,
        index: AttributionIndex,
        step: StepAttribution,
        position: int,
        score: float,
        negative: bool = False,
    ) -> str:
        """id, label, the score (for a normalized index a cosine of whitened gradients: 1 = the same
        direction, 0 = unrelated) and its percentile; a listed negative with a score >= 0 says so."""
        kind, captions = index.score_name, index.train_captions
        label = index.class_names[int(index.train_labels[position])]
        name = f"label {label}" if captions is None else captions[position]  # a text model's: its prompt
        prefix = "least aligned · " if negative and score >= 0 else ""
        return (
            f"{prefix}id {int(index.train_ids[position])} · {name} · {kind} {score:+.3f} · "
            f"p{step.percentile(position):.1f}"
        )

    def _gallery(self, index: AttributionIndex, step: StepAttribution, result: SearchResult) -> list[dict]:
        negative = result is step.negative
        return gallery_payload(
            [
                (self._thumbnail(index, int(p)), self._caption(index, step, int(p), float(s), negative))
                for p, s in zip(result.positions, result.scores)
            ]
        )

    def _likelihood(self, attribution: TrajectoryAttribution, rollouts: RolloutCurves | None) -> dict:
        steps, classes = attribution.trajectory.timesteps, self.explorer.class_names
        return plots.figure_template(plots.likelihood_figure(steps, attribution.proxy, classes, rollouts))

    def step_view(self, session: Session, step: int) -> tuple:
        """Outputs for one step: slider label, x_t, x0hat, both galleries, the plot, a step line
        that ends with this handler's own time."""
        started = time.perf_counter()
        attribution = session.attribution
        last = attribution.trajectory.steps - 1
        step = session.step = whole_number(step, "step", 0, last)
        current, index = attribution.steps[step], self._index(attribution.index_name)
        frame = lambda images: image_payload(plots.png_data_uri(plots.tensor_image(images[step], IMAGE_PX)))  # noqa: E731
        outputs = (
            gr.update(label=f"denoising step {step} of {last} · train timestep t = {current.timestep}"),
            *(frame(pictures) for pictures in attribution.trajectory.pictures[:2]),
            self._gallery(index, current, current.positive),
            self._gallery(index, current, current.negative),
            plot_payload(plots.with_marker(session.plot, current.timestep)),
        )
        proxy = attribution.proxy[step]
        if len(proxy):
            top = int(proxy.argmax())
            classified = f"classifier on x0hat: {self.explorer.class_names[top]} ({proxy[top]:.2f})"
        else:
            classified = "no feature classifier"
        link = export.view_query(attribution, step, len(current.positive.ids))
        info = (
            f"step {step} · t = {current.timestep} · index bucket {current.bucket} · {classified} · "
            f"{current.negatives_note()} · [link to this view]({link}) · "
            f"handler {1e3 * (time.perf_counter() - started):.1f} ms"
        )
        return (*outputs, info)

    def highlight(self, session: Session | None) -> tuple:
        """Both galleries' highlighted tile: the selected influencer where the step on screen lists it, else
        none (a gallery keeps its clicked tile position while its images change)."""
        if session is None:
            return gr.skip(), gr.skip()
        current = session.attribution.steps[session.step]
        ranks = []
        for sign, result in (("positive", current.positive), ("negative", current.negative)):
            listed = result.positions.tolist()
            chosen = (
                session.selected is not None and session.selected[0] == sign and session.selected[1] in listed
            )
            ranks.append(listed.index(session.selected[1]) if chosen else -1)  # -1 clears (None is ignored)
        return tuple(gr.update(selected_index=rank) for rank in ranks)

    def chosen_view(self, session: Session, step: int) -> tuple:
        """The selected influencer's panel at `step`: its image, its score at every step (marker at `step`)
        and what it scores and ranks here."""
        sign, position = session.selected
        attribution = session.attribution
        current, index = attribution.steps[step], self._index(attribution.index_name)
        curve = attribution.score_curve(position)  # (S,)
        peak = int(curve.argmax() if sign == "positive" else curve.argmin())
        timesteps = attribution.trajectory.timesteps
        result = current.positive if sign == "positive" else current.negative
        listed = result.positions.tolist()
        where = (
            f"#{listed.index(position) + 1} of the {sign} list"
            if position in listed
            else f"not in the {sign} list"
        )
        score = float(result.scores[listed.index(position)]) if position in listed else float(curve[step])
        caption = self._caption(index, current, position, score)  # as the gallery captions it where listed
        figure = plots.score_curve_figure(
            timesteps, curve, step, f"{caption.split(' · ' + index.score_name)[0]}: score at every step"
        )
        text = (
            f"**{sign} influencer at step {step} (t = {current.timestep})**, {where}: {caption}. "
            f"Its score is most {sign} at step {peak} (t = {timesteps[peak]}, score {curve[peak]:.3f})."
        )
        large = image_payload(plots.png_data_uri(plots.upscale(index.train_images[position], LARGE_PX)))
        return large, plot_payload(figure.to_json()), text

    def _chosen_or_skip(self, session: Session, step: int) -> tuple:
        return self.chosen_view(session, step) if session.selected else (gr.skip(),) * 3

    # -- events ----------------------------------------------------------------------------
    @user_errors(outputs=2, message_at=1)
    def export(self, session: Session | None, step) -> tuple:
        """The current step's influencers as JSON, CSV and a PNG figure (files to download)."""
        if session is None:
            raise ExplorerError("nothing generated yet: click Generate first")
        attribution = session.attribution
        step = whole_number(step, "step", 0, attribution.trajectory.steps - 1)
        files = export.export_step(
            attribution, self._index(attribution.index_name), step, len(attribution.steps[step].positive.ids)
        )
        return [str(path) for path in files], f"exported step {step}: {', '.join(p.name for p in files)}"

    def open_link(self, request: gr.Request) -> tuple:
        """A page opened with ?seed=S&steps=N&step=s&top_k=k regenerates that view (explorer.web.export)."""
        return export.open_view(self, dict(request.query_params) if request is not None else {})

    def rollouts_after_link(self, session: Session | None, progress=gr.Progress()) -> tuple:
        """The rollout curves of a view opened by link; nothing after a plain page load."""
        return (gr.skip(), gr.skip()) if session is None else self.rollouts(session, progress)

    def random_seed(self) -> int:
        return random.randint(0, MAX_SEED)

    @user_errors(outputs=15, message_at=10)
    @releases_memory
    def generate(
        self, seed, steps, top_k, index_name, prompt=None, guidance=1.0, progress=gr.Progress()
    ) -> tuple:
        """Sample (for the prompt, if any), attribute every step, classify every x0hat (one engine call)."""
        top_k, note = bounded(top_k, "top-k", 1, UI_MAX_TOP_K)
        stage = lambda done, what: progress(done, desc=what)  # noqa: E731
        attribution = self.explorer.generate(seed, steps, index_name, top_k, stage, prompt or None, guidance)
        trajectory, last = attribution.trajectory, attribution.trajectory.steps - 1
        session = Session(
            attribution, self._likelihood(attribution, None), last, notes=(note,) if note else ()
        )
        strip = gallery_payload(
            [
                (
                    plots.png_data_uri(plots.tensor_image(trajectory.pictures[0][s], THUMB_PX)),
                    f"t={trajectory.timesteps[s]}",
                )
                for s in session.strip_steps
            ]
        )
        final = image_payload(plots.png_data_uri(plots.tensor_image(trajectory.pictures[2], IMAGE_PX)))
        slider, *view = self.step_view(session, last)
        slider = gr.update(maximum=last, value=last, label=slider["label"])
        return (session, final, strip, slider, *view, session.status(), None, None, NO_INFLUENCER, top_k)

    @user_errors(outputs=2, message_at=1)
    @releases_memory
    def rollouts(self, session: Session | None, progress=gr.Progress()) -> tuple:
        """Feature likelihoods from stochastic completions (>= 16 at >= 10 steps); shown when ready, with the
        sampler steps done so far as progress."""
        if session is None:
            raise ExplorerError("nothing generated yet: click Generate first")
        if self.explorer.classifier is None:  # the plot already says so; nothing to compute
            return gr.skip(), session.status()
        started = time.perf_counter()

        def report(done: int, total: int) -> None:
            progress(
                done / total,
                desc=f"rollouts: {ROLLOUT_COMPLETIONS} completions, sampler step {done} of {total}",
            )

        curves = self.explorer.rollouts(
            session.attribution.trajectory,
            count=ROLLOUT_STEPS,
            completions=ROLLOUT_COMPLETIONS,
            on_step=report,
        )
        session.rollouts, session.rollout_s = curves, time.perf_counter() - started
        session.plot = self._likelihood(session.attribution, curves)
        return self.replot(session), session.status()

    def replot(self, session: Session | None) -> str | dict:
        """Resend the plot at the step on screen: a scrub that read it before the rollouts may land later."""
        timestep = session and session.attribution.steps[session.step].timestep
        return gr.skip() if session is None else plot_payload(plots.with_marker(session.plot, timestep))

    @user_errors(outputs=10, message_at=6)
    def scrub(self, session: Session | None, step) -> tuple:
        """Show one recorded step: a lookup in the session, no gradients; the selected influencer follows."""
        if session is None:
            raise ExplorerError("nothing generated yet: click Generate first")
        return (*self.step_view(session, step), *self._chosen_or_skip(session, session.step))

    @user_errors(outputs=13, message_at=8)
    @releases_memory
    def reattribute(self, session: Session | None, step, index_name, top_k) -> tuple:
        """The same trajectory against another index or top-k (no resampling); a top-k typed outside
        1..UI_MAX_TOP_K is clamped and the status says so."""
        if session is None:
            return (gr.skip(),) * 13
        top_k, note = bounded(top_k, "top-k", 1, UI_MAX_TOP_K)
        attribution = self.explorer.reattribute(session.attribution, index_name, top_k)
        new = Session(
            attribution,
            session.plot,
            session.step,
            session.rollouts,
            session.rollout_s,
            notes=(note,) if note else (),
        )
        return (new, *self.step_view(new, step), new.status(), None, None, NO_INFLUENCER, top_k)

    @user_errors(outputs=3, message_at=2)
    @releases_memory
    def compare(self, session: Session | None, step, name) -> tuple:
        """The second method's influencers at the step on screen (explorer.web.compare)."""
        return compare.compare_view(self, session, step, name)

    def compare_scrub(self, session: Session | None, step, name) -> tuple:
        """The comparison follows the slider; nothing to do while none is chosen."""
        if session is None or not name:
            return (gr.skip(),) * 3
        return self.compare(session, step, name)

    def jump(self, session: Session | None, evt: gr.SelectData) -> dict:
        """A click on the trajectory strip moves the step slider there."""
        if session is None:
            return gr.skip()
        return gr.update(value=session.strip_steps[evt.index])

    def pick(self, evt: gr.SelectData) -> tuple[str, int]:
        """A click in either influencer gallery: which one (by elem_id) and which rank."""
        return ("negative" if getattr(evt.target, "elem_id", None) == "negative" else "positive"), evt.index

    @user_errors(outputs=3, message_at=2)
    def select_influencer(self, session: Session | None, step, sign, rank) -> tuple:
        """A larger view of one influencer and its score at every step: when did it matter? It stays selected
        while the step changes."""
        if session is None:
            raise ExplorerError("nothing generated yet: click Generate first")
        attribution = session.attribution
        step = whole_number(step, "step", 0, attribution.trajectory.steps - 1)
        if sign not in ("positive", "negative"):
            raise ExplorerError(f"influencer sign {sign!r} is unknown: use 'positive' or 'negative'")
        current = attribution.steps[step]
        result = current.positive if sign == "positive" else current.negative
        rank = whole_number(rank, "influencer rank", 0, len(result.positions) - 1)
        session.selected = (sign, int(result.positions[rank]))
        return self.chosen_view(session, step)

    @user_errors(outputs=4, message_at=3)
    @releases_memory
    def attribute_image(self, image, timestep, top_k, index_name, prompt=None) -> tuple:
        """An uploaded image (any size or mode) as the query at one timestep, with a text model's prompt."""
        if not image:
            raise ExplorerError("no image uploaded: drop a PNG or JPEG into the image box first")
        path = (
            image.get("path") if isinstance(image, dict) else image
        )  # preprocess=False: the upload's FileData
        # preprocess=False skips gradio's own path check, so do it here: only files gradio received
        # as uploads are read, never an arbitrary server path named by a crafted request.
        if (
            not isinstance(path, str)
            or "\x00" in path
            or not gr_utils.is_in_or_equal(path, gr_utils.get_upload_folder())
        ):
            raise ExplorerError(
                f"image {str(path)[:80]!r} is not an uploaded file: upload the image through the page"
            )
        try:
            array = load_image_file(path, self.explorer.model.image_size, self.explorer.model.image_channels)
        except ExplorerError as error:  # name the upload, not the server's temporary path
            raise ExplorerError(str(error).replace(path, Path(path).name)) from None
        timestep = whole_number(timestep, "timestep", 0, self.explorer.model.num_train_timesteps - 1)
        top_k, note = bounded(top_k, "top-k", 1, UI_MAX_TOP_K)
        started = time.perf_counter()
        step = self.explorer.attribute_image(array, timestep, index_name, top_k, prompt=prompt or None)
        index = self._index(index_name)
        status = " · ".join(
            [
                f"t = {timestep} (bucket {step.bucket}) · top-{top_k} · {step.negatives_note()}",
                f"attributed in {time.perf_counter() - started:.2f} s",
                *([note] if note else []),
            ]
        )
        seen = image_payload(plots.png_data_uri(plots.upscale(array, IMAGE_PX)))
        return (
            seen,
            self._gallery(index, step, step.positive),
            self._gallery(index, step, step.negative),
            status,
        )
