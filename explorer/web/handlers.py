"""The web UI's event handlers (layout and wiring: ui.py; the session and the output groups: session.py).

Every handler is a few lines around one engine call. All steps are attributed at generate time and sent to
the browser at once (explorer.web.scrub_view), so moving the step slider costs the server nothing but the
panels that follow it (the selected influencer, a second method, a region). Each browser session keeps its
own `Session` in a gr.State; sessions never see each other's trajectory.

Handlers return their outputs already serialized (events use postprocess=False), with images inlined as
base64 PNG data URIs (`ImageData.url`, which gradio documents as "publicly available url or base64 encoded
image"); as files, gradio would write, path-check and serve every image separately.
"""

import logging
import random
import time

import gradio as gr

from explorer.attribution import Explorer, TrajectoryAttribution
from explorer.errors import ExplorerError, bounded, whole_number
from explorer.index import AttributionIndex
from explorer.memory import releases_memory
from explorer.sampler import MAX_SEED, MIN_STEPS
from explorer.web import api, compare, export, plots, region, scrub_view, story
from explorer.web.galleries import Galleries
from explorer.web.insight import InsightHandlers
from explorer.web.payloads import (
    ENGINE_LOCK,
    gallery_payload,
    holds_engine,
    image_payload,
    plot_payload,
    refusal,
    refused,
    skipped,
    user_errors,
)
from explorer.web.region import RegionHandlers
from explorer.web.rows import caption, training_row
from explorer.web.session import (  # noqa: F401  (the page's limits, here for the tests)
    UI_MAX_STEPS,
    UI_MAX_TOP_K,
    ChosenOutputs,
    CompareOutputs,
    ExportOutputs,
    FollowOutputs,
    GenerateOutputs,
    LinkOutputs,
    ReattributeOutputs,
    RegionLists,
    RolloutOutputs,
    Session,
)
from explorer.web.uploads import ImageHandlers

logger = logging.getLogger(__name__)

IMAGE_PX = plots.IMAGE_PX
LARGE_PX = 224  # the selected influencer
ROLLOUT_STEPS, ROLLOUT_COMPLETIONS = 12, 16  # rollout curves: 16 completions at 12 steps
NO_INFLUENCER = "Click an influencer to see when it mattered."
QUIET = lambda *a, **k: None  # noqa: E731  (progress for calls outside an event)


class Stopped(Exception):
    """The completions of a generation that a newer Generate replaced."""


class Handlers(RegionHandlers, InsightHandlers, ImageHandlers):
    """The event handlers, bound to one Explorer (shared, read-only) and given per-session state; the region
    and the bias & memorization views' handlers live with those views."""

    def __init__(self, explorer: Explorer):
        self.explorer = explorer
        self.galleries = Galleries()
        self._bias, self._copies, self._backgrounds = {}, {}, {}  # per index, computed once

    def _index(self, name: str | None) -> AttributionIndex:
        return self.explorer.index(name)[1]

    # -- what the page shows of a session ----------------------------------------------------------
    def _figure(self, attribution: TrajectoryAttribution, rollouts) -> dict:
        """The likelihood over the influencers' classes (plots.likelihood_figure) as a JSON template."""
        index = self._index(attribution.index_name)
        shares = story.class_shares(attribution, index)
        classes, timesteps = self.explorer.class_names, attribution.trajectory.timesteps
        figure = plots.likelihood_figure(
            timesteps, attribution.proxy, classes, rollouts, shares, index.class_names
        )
        return plots.figure_template(figure)

    def _plot(self, session: Session) -> dict:
        return plot_payload(plots.with_marker(session.plot, session.attribution.steps[session.step].timestep))

    def _view(self, session: Session) -> str:
        """The step view's payload: every step at once (explorer.web.scrub_view)."""
        attribution = session.attribution
        index, classes = self._index(attribution.index_name), self.explorer.class_names
        abar = self.explorer.model.scheduler.alphas_cumprod.numpy()
        notes = story.step_notes(attribution, index, abar, classes, session.rollouts)
        selected = session.selected[1] if session.selected else None
        thumbnail = lambda row: self.galleries.pixels(index, row)  # noqa: E731
        return scrub_view.payload(attribution, index, notes, session.step, selected, thumbnail, classes)

    def chosen_view(self, session: Session, step: int) -> ChosenOutputs:
        """The selected influencer's panel at `step`: its image, its score at every step (marker at `step`)
        and what it scores and ranks here."""
        sign, position = session.selected
        attribution = session.attribution
        current, index = attribution.steps[step], self._index(attribution.index_name)
        curve = attribution.score_curve(position)  # (S,)
        peak = int(curve.argmax() if sign == "positive" else curve.argmin())
        timesteps = attribution.trajectory.timesteps
        listed = (current.positive if sign == "positive" else current.negative).positions.tolist()
        where = (
            f"#{listed.index(position) + 1} of the {sign} list"
            if position in listed
            else f"not in the {sign} list"
        )
        text = caption(training_row(index, current, position, float(curve[step]), sign), index.score_name)
        title = f"{text.split(' · ' + index.score_name)[0]}: score at every step"
        figure = plots.score_curve_figure(timesteps, curve, step, title)
        info = (
            f"**{sign} influencer at step {step} (t = {current.timestep})**, {where}: {text}. "
            f"Its score is most {sign} at step {peak} (t = {timesteps[peak]}, score {curve[peak]:.3f})."
        )
        large = image_payload(plots.png_data_uri(plots.upscale(index.train_images[position], LARGE_PX)))
        return ChosenOutputs(large, plot_payload(figure.to_json()), info)

    # -- Generate, links, the completions ----------------------------------------------------------
    def random_seed(self) -> int:
        return random.randint(0, MAX_SEED)

    def stop_completions(self, session: Session | None) -> None:
        """Runs outside the queue as Generate is clicked: the old generation's completions stop at their next
        sampler step, so Generate does not wait for them (gradio's cancel waits for a running thread)."""
        if session is not None:
            session.cancelled = True

    @releases_memory
    def generate(
        self,
        session,
        seed,
        steps,
        top_k,
        index_name,
        prompt=None,
        guidance=1.0,
        progress=gr.Progress(),
        step=None,
    ) -> GenerateOutputs:
        """Sample, attribute every step, classify every x0hat (one engine call); the old generation's
        completions stop. A refusal stays in the status line, in front of what the page still shows."""
        if session is not None:
            session.cancelled = True  # its completions' event was cancelled with this click (ui.py)
        try:
            return self._generate(seed, steps, top_k, index_name, prompt, guidance, progress, step)
        except ExplorerError as error:
            logger.info("user error in generate: %s", error)
            if session is None:
                return refusal(GenerateOutputs, "status", error)
            session.refusal = refused(error)
            return skipped(GenerateOutputs)._replace(status=session.status())

    @holds_engine
    def _generate(self, seed, steps, top_k, index_name, prompt, guidance, progress, step) -> GenerateOutputs:
        steps, steps_note = bounded(steps, "sampler steps", MIN_STEPS, UI_MAX_STEPS)
        top_k, top_k_note = bounded(top_k, "top-k", 1, UI_MAX_TOP_K)
        stage = lambda done, what: progress(done, desc=what)  # noqa: E731
        attribution = self.explorer.generate(seed, steps, index_name, top_k, stage, prompt or None, guidance)
        trajectory, last = attribution.trajectory, attribution.trajectory.steps - 1
        shown, step_note = (last, "") if step is None else bounded(step, "step", 0, last)
        notes = tuple(note for note in (steps_note, top_k_note, step_note) if note)
        session = Session(attribution, self._figure(attribution, None), shown, notes=notes)
        picture = lambda image, size: plots.png_data_uri(plots.tensor_image(image, size))  # noqa: E731
        strip = [
            (picture(trajectory.pictures[0][s], 112), f"t={trajectory.timesteps[s]}")
            for s in session.strip_steps
        ]
        return GenerateOutputs(
            session=session,
            final=image_payload(picture(trajectory.pictures[2], IMAGE_PX)),
            strip=gallery_payload(strip),
            slider=gr.update(maximum=last, value=shown),
            scrub=self._view(session),
            plot=self._plot(session),
            status=session.status(),
            chosen=None,
            chosen_plot=None,
            chosen_info=NO_INFLUENCER,
            top_k=top_k,
            steps=steps,
        )

    def open_link(self, request: gr.Request) -> tuple:
        """A page opened with ?seed=S&steps=N&step=s&top_k=k regenerates that view (export.link_arguments);
        values beyond the page's controls are clamped and said."""
        link = export.link_arguments(dict(request.query_params) if request is not None else {})
        if link is None:  # a plain page load
            return (gr.skip(),) * len(LinkOutputs.fields())
        step, seed, prompt, guidance = (
            link.pop("step"),
            link.pop("seed"),
            link.pop("prompt"),
            link.pop("guidance"),
        )
        generated = self.generate(
            None, seed, link["steps"], link["top_k"], None, prompt, guidance, QUIET, step
        )
        trajectory = (
            generated.session.attribution.trajectory if isinstance(generated.session, Session) else None
        )
        if trajectory is None:  # refused: the status line says why
            return LinkOutputs(gr.skip(), gr.skip(), gr.skip(), generated).flat()
        text = trajectory.prompt is not None  # a text model's prompt and guidance go back into their boxes
        shown = (trajectory.prompt, trajectory.guidance) if text else (gr.skip(), gr.skip())
        return LinkOutputs(trajectory.seed, *shown, generated).flat()

    @releases_memory
    @holds_engine
    def rollouts(self, session: Session | None, progress=gr.Progress()) -> RolloutOutputs:
        """Feature likelihoods from stochastic completions (16 at 12 steps), shown when ready, with the
        sampler steps done so far as progress; nothing when this generation already has them or was
        replaced."""
        if session is None or session.rollouts is not None or session.cancelled:
            return skipped(RolloutOutputs)
        if self.explorer.classifier is None:  # the plot already says so; nothing to compute
            return skipped(RolloutOutputs)._replace(status=session.status())
        started = time.perf_counter()

        def report(done: int, total: int) -> None:
            if session.cancelled:
                raise Stopped
            progress(done / total, desc=f"completions from x_t: sampler step {done} of {total}")

        trajectory = session.attribution.trajectory
        try:
            curves = self.explorer.rollouts(trajectory, ROLLOUT_STEPS, ROLLOUT_COMPLETIONS, on_step=report)
        except Stopped:
            logger.info("completions of seed %s stopped by a newer Generate", trajectory.seed)
            return skipped(RolloutOutputs)
        session.rollouts, session.rollout_s = curves, time.perf_counter() - started
        session.plot = self._figure(session.attribution, curves)
        return RolloutOutputs(self._view(session), self._plot(session), session.status())

    # -- the same trajectory, another method or top-k ------------------------------------------------
    @user_errors(ReattributeOutputs, "status")
    @releases_memory
    @holds_engine
    def reattribute(self, session: Session | None, step, index_name, top_k) -> ReattributeOutputs:
        """The same trajectory against another index or top-k (no resampling); a top-k typed outside
        1..UI_MAX_TOP_K is clamped and the status says so."""
        if session is None:
            return skipped(ReattributeOutputs)
        top_k, note = bounded(top_k, "top-k", 1, UI_MAX_TOP_K)
        step = whole_number(step, "step", 0, session.attribution.trajectory.steps - 1)
        attribution = self.explorer.reattribute(session.attribution, index_name, top_k)
        session.attribution, session.step, session.selected = attribution, step, None
        session.notes, session.refusal = ((note,) if note else ()), None
        session.plot = self._figure(attribution, session.rollouts)
        chosen = (None, None, NO_INFLUENCER)
        return ReattributeOutputs(self._view(session), self._plot(session), session.status(), *chosen, top_k)

    # -- what follows the step slider on the server ------------------------------------------------
    def follow_step(self, session: Session | None, step, compare_name) -> tuple:
        """The panels that follow the slider: the selected influencer, a second method, a region (each only
        when shown; a refusal goes to that panel's note)."""
        if session is None:
            return FollowOutputs(skipped(ChosenOutputs), skipped(CompareOutputs), skipped(RegionLists)).flat()
        try:
            session.step = step = whole_number(step, "step", 0, session.attribution.trajectory.steps - 1)
        except ExplorerError as error:
            return FollowOutputs(
                refusal(ChosenOutputs, "chosen_info", error), skipped(CompareOutputs), skipped(RegionLists)
            ).flat()
        chosen = self.chosen_view(session, step) if session.selected else skipped(ChosenOutputs)
        second = self.compare(session, step, compare_name) if compare_name else skipped(CompareOutputs)
        lists = skipped(RegionLists)
        try:
            lists = region.follow(self.explorer, self.galleries, session, step)
        except ExplorerError as error:
            lists = refusal(RegionLists, "region_info", error)
        return FollowOutputs(chosen, second, lists).flat()

    @user_errors(CompareOutputs, "compare_info")
    @releases_memory
    def compare(self, session: Session | None, step, name) -> CompareOutputs:
        """The second method's influencers at the step on screen (explorer.web.compare)."""
        return compare.compare_view(self.explorer, self.galleries, session, step, name)

    def jump(self, session: Session | None, evt: gr.SelectData) -> dict:
        """A click on the trajectory strip moves the step slider there."""
        return gr.skip() if session is None else gr.update(value=session.strip_steps[evt.index])

    @user_errors(ChosenOutputs, "chosen_info")
    def select_influencer(self, session: Session | None, step, sign, rank) -> ChosenOutputs:
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

    def select_tile(self, session: Session | None, step, evt: gr.SelectData) -> ChosenOutputs:
        """A click on a tile of the step view: its sign and rank come with the event."""
        return self.select_influencer(session, step, evt.value, evt.index)

    @user_errors(ExportOutputs, "export_note")
    def export(self, session: Session | None, step) -> ExportOutputs:
        """The current step's influencers as JSON, CSV and a PNG figure (files to download)."""
        if session is None:
            raise ExplorerError("nothing generated yet: click Generate first")
        attribution = session.attribution
        step = whole_number(step, "step", 0, attribution.trajectory.steps - 1)
        top_k = len(attribution.steps[step].positive.ids)
        files = export.export_step(attribution, self._index(attribution.index_name), step, top_k)
        shown = gr.update(value=[str(path) for path in files], visible=True)
        return ExportOutputs(shown, f"exported step {step}: {', '.join(p.name for p in files)}")

    # -- the API for scripts and the Attribute-an-image tab --------------------------------------------
    def attribute_trajectory(
        self,
        seed: int,
        steps: int = 50,
        top_k: int = 8,
        method: str = "",
        prompt: str = "",
        guidance: float = 1.0,
        completions: int = 16,
    ) -> dict:
        """Generate with a seed and attribute every denoising step; returns JSON. Per step: step, t,
        bucket, positive and negative influencers (sign, rank, id, label, caption for text models, score,
        percentile, kind), negative_count, x0hat_p (the classifier's p(class | x0hat)); and the completions'
        p(class | x_t) with standard errors at 12 steps (completions=0: none), classes, method, score,
        timings_s.

        Args:
            seed: sampler seed, 0 to 2147483647 (the page's seed gives the page's trajectory)
            steps: sampler steps, 10 to 1000
            top_k: influencers per sign and step, 1 to 100
            method: index name as in the page's method menu ("" = the first)
            prompt: a text-to-image model's prompt ("" for pixel models)
            guidance: classifier-free guidance scale (1 = none)
            completions: stochastic completions per start step for p(class | x_t), 0 to 64 (0 = skip)
        """
        try:
            with ENGINE_LOCK:
                return api.attribute_trajectory(
                    self.explorer, seed, steps, top_k, method, prompt, guidance, completions
                )
        except ExplorerError as error:
            raise gr.Error(str(error)) from None
