"""The Gradio web UI: generate a digit, scrub the denoising steps, watch influencers and likelihoods.

Only this module and plots.py import gradio and plotly; the engine never does. Every handler is
a few lines around one engine call. All steps are attributed at generate time, so moving the
step slider only reads the session's state (no gradients). Each browser session keeps its own
`Session` in a gr.State; sessions never see each other's trajectory.
"""

import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from gradio.components.gallery import GalleryImage
from gradio.components.plot import PlotData
from gradio.data_classes import ImageData
from gradio.utils import get_upload_folder

from explorer import plots
from explorer.attribution import MAX_TOP_K, Explorer, StepAttribution, TrajectoryAttribution
from explorer.data import load_image_file
from explorer.errors import ExplorerError
from explorer.index import AttributionIndex, SearchResult
from explorer.likelihood import RolloutCurves
from explorer.sampler import MAX_SEED, MIN_STEPS

logger = logging.getLogger(__name__)

IMAGE_PX = 160  # x_t, x0hat and the final image, upscaled nearest (16 px -> 160 px)
THUMB_PX = 112  # influencer thumbnails
LARGE_PX = 224  # the selected influencer
STRIP_COUNT = 10  # x_t thumbnails along the trajectory
UI_MAX_STEPS = 200  # sampler steps offered by the slider (the engine accepts more)
UI_MAX_TOP_K = 32
ROLLOUT_STEPS, ROLLOUT_COMPLETIONS = 12, 16  # rollout curves: 16 completions at 12 steps
CSS = ".pixelated img, img.pixelated { image-rendering: pixelated; }"


def theme() -> gr.themes.Base:
    """The default theme with system fonts only, so the page fetches nothing from the internet."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Launch with this UI's theme and CSS, server-side rendering and sharing off."""
    return demo.launch(server_name=host, server_port=port, share=False, ssr_mode=False,
                       theme=theme(), css=CSS, **kwargs)


def user_errors(handler: Callable) -> Callable:
    """Show ExplorerError messages in the page (gr.Error), never a stack trace."""
    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except ExplorerError as error:
            logger.info("user error in %s: %s", handler.__name__, error)
            raise gr.Error(str(error)) from None
    return wrapper


def whole_number(value, name: str, low: int, high: int) -> int:
    """`value` as an int in [low, high], or an ExplorerError naming it."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ExplorerError(f"{name} {value!r} is not a number: use a whole number from {low} to {high}") from None
    if isinstance(value, bool) or not number.is_integer() or not low <= number <= high:
        raise ExplorerError(f"{name} {value!r} is out of range: use a whole number from {low} to {high}")
    return int(number)


def plot_data(figure_json: str) -> PlotData:
    """A plotly figure already serialized to JSON, as gr.Plot's value."""
    return PlotData(type="plotly", plot=figure_json)


def wire_format(values: tuple) -> list:
    """The step view (see Handlers.step_view) in the components' serialized form.

    The scrub event is registered with postprocess=False and returns this: gradio's own
    postprocessing would pass every gallery file through its cache checks twice and start a
    thread pool per gallery, which is most of a slider update's server time.
    """
    slider, xt, x0, positive, negative, plot, info = values

    def image(path: str) -> dict:
        return ImageData(path=path, orig_name=Path(path).name, mime_type="image/png").model_dump()

    def gallery(items: list[tuple[str, str]]) -> list[dict]:
        return [GalleryImage(image=ImageData(path=path, orig_name=Path(path).name, mime_type="image/png"),
                             caption=caption).model_dump() for path, caption in items]

    return [slider, image(xt), image(x0), gallery(positive), gallery(negative), plot.model_dump(), info]


@dataclass(eq=False)
class Session:
    """One browser session's generation: every step's attribution, later the rollout curves."""

    attribution: TrajectoryAttribution
    plot: dict  # the likelihood figure as JSON (plots.figure_template); scrubbing only moves its marker
    step: int  # the step on screen
    rollouts: RolloutCurves | None = None
    rollout_s: float | None = None

    @property
    def strip_steps(self) -> list[int]:
        """The steps shown in the trajectory strip, noisiest first."""
        last = self.attribution.trajectory.steps - 1
        return sorted(set(np.linspace(0, last, min(STRIP_COUNT, last + 1)).round().astype(int).tolist()))

    def status(self) -> str:
        a, t = self.attribution, self.attribution.timings
        parts = [f"seed {a.trajectory.seed} · {a.trajectory.steps} steps · {a.index_name}",
                 f"sample {t['sample_s']:.2f} s · attribute {t['attribute_s']:.2f} s · proxy {t['proxy_s']:.2f} s"]
        if self.rollouts is None:
            parts.append("rollout curves: computing…")
        else:
            parts.append(f"rollouts ({len(self.rollouts.steps)} steps × {self.rollouts.completions} completions) "
                         f"{self.rollout_s:.1f} s")
        return " · ".join(parts)


class Handlers:
    """The event handlers, bound to one Explorer (shared, read-only) and given per-session state."""

    def __init__(self, explorer: Explorer, pngs: plots.PngStore):
        self.explorer, self.pngs = explorer, pngs

    # -- helpers ---------------------------------------------------------------------------
    def _index(self, name: str | None) -> AttributionIndex:
        return self.explorer.index(name)[1]

    def _caption(self, index: AttributionIndex, step: StepAttribution, position: int, score: float) -> str:
        label = index.class_names[int(index.train_labels[position])]
        return f"id {int(index.train_ids[position])} · label {label} · score {score:.3f} · p{step.percentile(position):.1f}"

    def _png(self, image: np.ndarray, size: int) -> str:
        return self.pngs.path(plots.upscale(image, size))

    def _gallery(self, index: AttributionIndex, step: StepAttribution, result: SearchResult) -> list[tuple[str, str]]:
        return [(self._png(index.train_images[p], THUMB_PX), self._caption(index, step, int(p), float(s)))
                for p, s in zip(result.positions, result.scores)]

    def _likelihood(self, attribution: TrajectoryAttribution, rollouts: RolloutCurves | None) -> dict:
        figure = plots.likelihood_figure(attribution.trajectory.timesteps, attribution.proxy,
                                         self.explorer.class_names, rollouts)
        return plots.figure_template(figure)

    def step_view(self, session: Session, step: int, wire: bool = False) -> tuple:
        """Outputs for one step: slider label, x_t, x0hat, both galleries, the plot, a step line.

        Images are PNG paths (each distinct image is encoded once), the plot is pre-serialized JSON.
        wire=True returns the serialized form (see `wire_format`), so the reported handler time
        covers everything but gradio's transport.
        """
        started = time.perf_counter()
        attribution = session.attribution
        last = attribution.trajectory.steps - 1
        step = whole_number(step, "step", 0, last)
        session.step = step
        current, index = attribution.steps[step], self._index(attribution.index_name)
        proxy = attribution.proxy[step]
        outputs = (
            gr.update(label=f"denoising step {step} of {last} · train timestep t = {current.timestep}"),
            self.pngs.path(plots.tensor_image(attribution.trajectory.xt[step], IMAGE_PX)),
            self.pngs.path(plots.tensor_image(attribution.trajectory.x0hat[step], IMAGE_PX)),
            self._gallery(index, current, current.positive),
            self._gallery(index, current, current.negative),
            plot_data(plots.with_marker(session.plot, current.timestep)),
        )
        top = int(proxy.argmax())
        info = (f"step {step} · t = {current.timestep} · index bucket {current.bucket} · classifier on x0hat: "
                f"{self.explorer.class_names[top]} ({proxy[top]:.2f})")
        if wire:
            outputs = wire_format((*outputs, info))[:-1]
        info += f" · handler {1e3 * (time.perf_counter() - started):.1f} ms"
        return (*outputs, info)

    @staticmethod
    def _no_influencer() -> tuple:
        return None, None, "Click an influencer to see when it mattered."

    # -- events ----------------------------------------------------------------------------
    def random_seed(self) -> int:
        return random.randint(0, MAX_SEED)

    @user_errors
    def generate(self, seed, steps, top_k, index_name, progress=gr.Progress()) -> tuple:
        """Sample, attribute every step, classify every x0hat (one engine call)."""
        progress(0.05, desc="sampling, then attributing every step")
        top_k = whole_number(top_k, "top-k", 1, MAX_TOP_K)
        attribution = self.explorer.generate(seed, steps, index_name, top_k)
        last = attribution.trajectory.steps - 1
        session = Session(attribution, self._likelihood(attribution, None), last)
        strip = [(self.pngs.path(plots.tensor_image(attribution.trajectory.xt[s], THUMB_PX)),
                  f"t={attribution.trajectory.timesteps[s]}") for s in session.strip_steps]
        slider, *view = self.step_view(session, last)
        slider = gr.update(maximum=last, value=last, label=slider["label"])
        final = self.pngs.path(plots.tensor_image(attribution.trajectory.final, IMAGE_PX))
        return (session, final, strip, slider, *view, session.status(), *self._no_influencer())

    @user_errors
    def rollouts(self, session: Session | None, progress=gr.Progress()) -> tuple:
        """Feature likelihoods from stochastic completions (>= 16 at >= 10 steps); shown when ready."""
        if session is None:
            raise ExplorerError("nothing generated yet: click Generate first")
        progress(0.05, desc=f"{ROLLOUT_COMPLETIONS} completions from {ROLLOUT_STEPS} steps")
        started = time.perf_counter()
        curves = self.explorer.rollouts(session.attribution.trajectory, count=ROLLOUT_STEPS, completions=ROLLOUT_COMPLETIONS)
        session.rollouts, session.rollout_s = curves, time.perf_counter() - started
        session.plot = self._likelihood(session.attribution, curves)
        timestep = session.attribution.trajectory.timesteps[session.step]
        return plot_data(plots.with_marker(session.plot, timestep)), session.status()

    @user_errors
    def scrub(self, session: Session | None, step) -> tuple:
        """Show one recorded step: a lookup in the session, no gradients."""
        if session is None:
            raise ExplorerError("nothing generated yet: click Generate first")
        return self.step_view(session, step, wire=True)

    @user_errors
    def reattribute(self, session: Session | None, step, index_name, top_k) -> tuple:
        """The same trajectory against another index or top-k (no resampling)."""
        if session is None:
            return (gr.skip(),) * 12
        top_k = whole_number(top_k, "top-k", 1, MAX_TOP_K)
        attribution = self.explorer.reattribute(session.attribution, index_name, top_k)
        new = Session(attribution, session.plot, session.step, session.rollouts, session.rollout_s)
        return (new, *self.step_view(new, step), new.status(), *self._no_influencer())

    def jump(self, session: Session | None, evt: gr.SelectData) -> dict:
        """A click on the trajectory strip moves the step slider there."""
        if session is None:
            return gr.skip()
        return gr.update(value=session.strip_steps[evt.index])

    def pick(self, evt: gr.SelectData) -> tuple[str, int]:
        """A click in either influencer gallery: which one (by elem_id) and which rank."""
        return ("negative" if getattr(evt.target, "elem_id", None) == "negative" else "positive"), evt.index

    @user_errors
    def select_influencer(self, session: Session | None, step, sign, rank) -> tuple:
        """A larger view of one influencer and its score at every step: when did it matter?"""
        if session is None:
            raise ExplorerError("nothing generated yet: click Generate first")
        attribution = session.attribution
        step = whole_number(step, "step", 0, attribution.trajectory.steps - 1)
        if sign not in ("positive", "negative"):
            raise ExplorerError(f"influencer sign {sign!r} is unknown: use 'positive' or 'negative'")
        current = attribution.steps[step]
        result = current.positive if sign == "positive" else current.negative
        rank = whole_number(rank, "influencer rank", 0, len(result.positions) - 1)
        position, index = int(result.positions[rank]), self._index(attribution.index_name)
        curve = attribution.score_curve(position)  # (S,)
        peak = int(curve.argmax() if sign == "positive" else curve.argmin())
        timesteps = attribution.trajectory.timesteps
        caption = self._caption(index, current, position, float(result.scores[rank]))
        figure = plots.score_curve_figure(timesteps, curve, step, f"{caption.split(' · score')[0]}: score at every step")
        text = (f"**{sign} influencer #{rank + 1} at t = {current.timestep}**: {caption}. "
                f"Its score is most {sign} at step {peak} (t = {timesteps[peak]}, score {curve[peak]:.3f}).")
        return self._png(index.train_images[position], LARGE_PX), figure, text

    @user_errors
    def attribute_image(self, image, timestep, top_k, index_name) -> tuple:
        """An uploaded image (any size or mode) as the query at one train timestep."""
        if not image:
            raise ExplorerError("no image uploaded: drop a PNG or JPEG into the image box first")
        path = image.get("path") if isinstance(image, dict) else image
        array = load_image_file(path, self.explorer.model.sample_size)
        timestep = whole_number(timestep, "timestep", 0, self.explorer.model.num_train_timesteps - 1)
        top_k = whole_number(top_k, "top-k", 1, MAX_TOP_K)
        started = time.perf_counter()
        step = self.explorer.attribute_image(array, timestep, index_name, top_k)
        index = self._index(index_name)
        status = f"t = {timestep} (bucket {step.bucket}) · top-{top_k} · attributed in {time.perf_counter() - started:.2f} s"
        return (self._png(array, IMAGE_PX), self._gallery(index, step, step.positive),
                self._gallery(index, step, step.negative), status)


def build(explorer: Explorer) -> gr.Blocks:
    """The explorer page: a 'Generate & scrub' tab and an 'Attribute an image' tab."""
    h = Handlers(explorer, plots.PngStore(Path(get_upload_folder()) / "explorer"))
    names = list(explorer.indexes)
    T = explorer.model.num_train_timesteps
    pixel = dict(elem_classes=["pixelated"])
    with gr.Blocks(title="Diffusion Attribution Explorer") as demo:
        gr.Markdown("## Diffusion Attribution Explorer\nWhich training images made this generated image, "
                    "and **at which denoising step** did they matter? Generate a digit, then scrub the steps.")
        session = gr.State(None)
        with gr.Tab("Generate & scrub"):
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    with gr.Row():
                        seed = gr.Number(value=0, label=f"seed (0 to {MAX_SEED})", scale=3)
                        dice = gr.Button("random", scale=1, min_width=60)
                    steps = gr.Slider(MIN_STEPS, UI_MAX_STEPS, value=50, step=1, label="sampler steps")
                    top_k = gr.Slider(1, UI_MAX_TOP_K, value=8, step=1, label="top-k influencers")
                    index_name = gr.Dropdown(names, value=names[0], label="method / index", visible=len(names) > 1)
                    go_button = gr.Button("Generate", variant="primary")
                    final = gr.Image(label="generated image", height=IMAGE_PX + 40, interactive=False, format="png", **pixel)
                with gr.Column(scale=4):
                    status = gr.Markdown("Click **Generate** to sample a digit and attribute every step.")
                    strip = gr.Gallery(label="x_t along the trajectory (click to jump)", columns=STRIP_COUNT, rows=1,
                                       height=150, allow_preview=False, format="png", **pixel)
                    slider = gr.Slider(0, 49, value=49, step=1, label="denoising step")
                    step_info = gr.Markdown("")
                    with gr.Row():
                        xt = gr.Image(label="x_t (sampler input)", height=IMAGE_PX + 40, interactive=False, format="png", **pixel)
                        x0 = gr.Image(label="x0hat (one-step estimate)", height=IMAGE_PX + 40, interactive=False, format="png", **pixel)
                        plot = gr.Plot(label="feature likelihood p(class | x_t)", scale=3)
                    with gr.Row():
                        positive = gr.Gallery(label="top positive influencers", columns=4, height=330,
                                              allow_preview=False, format="png", elem_id="positive", **pixel)
                        negative = gr.Gallery(label="top negative influencers", columns=4, height=330,
                                              allow_preview=False, format="png", elem_id="negative", **pixel)
                    with gr.Row():
                        chosen = gr.Image(label="selected influencer", height=LARGE_PX + 40, interactive=False,
                                          format="png", scale=1, **pixel)
                        with gr.Column(scale=3):
                            chosen_info = gr.Markdown(Handlers._no_influencer()[2])
                            chosen_plot = gr.Plot(label="when did this image matter?")
                    sign = gr.Textbox(visible=False)
                    rank = gr.Number(visible=False, precision=0)
        with gr.Tab("Attribute an image"):
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    upload = gr.Image(type="filepath", label="query image (any size; resized to the model's)",
                                      sources=["upload", "clipboard"], height=240)
                    timestep = gr.Slider(0, T - 1, value=T // 10, step=1, label=f"train timestep t (0 to {T - 1})")
                    image_top_k = gr.Slider(1, UI_MAX_TOP_K, value=8, step=1, label="top-k influencers")
                    image_index = gr.Dropdown(names, value=names[0], label="method / index", visible=len(names) > 1)
                    attribute_button = gr.Button("Attribute", variant="primary")
                with gr.Column(scale=4):
                    image_status = gr.Markdown("Upload an image, pick a timestep, click **Attribute**.")
                    with gr.Row():
                        seen = gr.Image(label="what the model sees", height=IMAGE_PX + 40, interactive=False,
                                        format="png", scale=1, **pixel)
                        image_positive = gr.Gallery(label="top positive influencers", columns=4, height=330,
                                                    allow_preview=False, format="png", scale=3, **pixel)
                    image_negative = gr.Gallery(label="top negative influencers", columns=6, height=330,
                                                allow_preview=False, format="png", **pixel)

        view = [slider, xt, x0, positive, negative, plot, step_info]
        chosen_views = [chosen, chosen_plot, chosen_info]
        dice.click(h.random_seed, None, seed, api_name="random_seed", queue=False)
        generated = go_button.click(h.generate, [seed, steps, top_k, index_name],
                                    [session, final, strip, *view, status, *chosen_views],
                                    api_name="generate", concurrency_id="engine")
        rollouts = generated.success(h.rollouts, [session], [plot, status], api_name="rollouts",
                                     concurrency_id="engine", show_progress="minimal")
        go_button.click(None, None, None, cancels=[rollouts], queue=False)
        slider.change(h.scrub, [session, slider], view, api_name="scrub", trigger_mode="always_last",
                      show_progress="hidden", concurrency_limit=4, postprocess=False)
        for control, trigger in ((index_name, index_name.change), (top_k, top_k.release)):
            trigger(h.reattribute, [session, slider, index_name, top_k], [session, *view, status, *chosen_views],
                    api_name=f"reattribute_{'index' if control is index_name else 'top_k'}", concurrency_id="engine")
        strip.select(h.jump, [session], slider, api_name="jump", show_progress="hidden")
        gr.on([positive.select, negative.select], h.pick, None, [sign, rank], api_name="pick_influencer",
              show_progress="hidden").success(h.select_influencer, [session, slider, sign, rank], chosen_views,
                                              api_name="select_influencer")
        # preprocess=False: the handler reads the upload itself, so a corrupt file gets a clear message
        attribute_button.click(h.attribute_image, [upload, timestep, image_top_k, image_index],
                               [seen, image_positive, image_negative, image_status],
                               api_name="attribute_image", preprocess=False, concurrency_id="engine")
    return demo
