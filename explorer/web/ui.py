"""The Gradio web UI: generate a digit, scrub the denoising steps, watch influencers and likelihoods.

`build(explorer)` lays out the page (`Page`: every component by name) and wires every event to the handlers
in handlers.py; each event's outputs are a named group (explorer.web.session), taken from the page by name.
`launch` serves it offline (system fonts, no analytics, no server-side rendering). The page's own events are
left off the API page (api_visibility="undocumented": still callable, as the tests do); the one documented
endpoint for scripts is /attribute_trajectory (explorer.web.api).
"""

import gradio as gr

from explorer.attribution import Explorer
from explorer.sampler import MAX_SEED, MIN_STEPS
from explorer.web import scrub_view
from explorer.web.compare import NO_COMPARISON
from explorer.web.handlers import IMAGE_PX, LARGE_PX, NO_INFLUENCER, UI_MAX_STEPS, UI_MAX_TOP_K, Handlers
from explorer.web.region import NO_REGION, RegionClick, RegionOutputs, RegionReset
from explorer.web.session import (
    STRIP_COUNT,
    ChosenOutputs,
    CompareOutputs,
    ExportOutputs,
    FollowOutputs,
    GenerateOutputs,
    LinkOutputs,
    ReattributeOutputs,
    RolloutOutputs,
)
from explorer.web.tabs import image_tab, insight_tab

SESSION_TTL_S = 3600  # a session's generation is freed an hour after it last changed (bench/load.py: memory)
CSS = (
    """
.pixelated img { image-rendering: pixelated; }
.strip .grid-container { grid-template-columns: repeat(var(--grid-cols), minmax(48px, 1fr)); }
.strip .caption-label { font-size: 10px; }
.influencers .thumbnail-item { display: flex; flex-direction: column; height: auto; }
.influencers .thumbnail-item img { object-fit: contain; }
.block.influencers { height: auto !important; }
.influencers .grid-wrap { height: auto !important; max-height: none !important; overflow: visible; }
.influencers .caption-label { position: static; white-space: normal; max-width: none; margin: 0;
                              padding: 1px 3px; font-size: 10px; line-height: 1.15; opacity: 1; }
/* a gallery's label above its tiles, not on them */
.influencers label[data-testid="block-label"].float { position: static; }
#progress { min-height: 44px; }
"""
    + scrub_view.CSS
)
SHOW_STEP_JS = "(step) => { if (window.daxScrub) window.daxScrub.show(step); }"
UI = dict(api_visibility="undocumented")  # the page's events: callable, not on the API page


class Page:
    """The page's components by name (attributes); `group` lists those of a named output group in order."""

    def group(self, group: type) -> list:
        fields = group.fields() if hasattr(group, "fields") else group._fields
        return [getattr(self, name) for name in fields]


def theme() -> gr.themes.Base:
    """The default theme with system fonts only, so the page fetches nothing from the internet."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "monospace"],
    )


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Launch with this UI's theme and CSS; server-side rendering and sharing off."""
    return demo.launch(
        server_name=host, server_port=port, share=False, ssr_mode=False, theme=theme(), css=CSS, **kwargs
    )


def gallery_pair(whose: str, prefix: str) -> tuple[gr.Gallery, gr.Gallery]:
    """A view's positive and negative influencer galleries (#PREFIX-positive, #PREFIX-negative)."""
    return tuple(
        gr.Gallery(
            label=f"{whose} top {sign} influencers",
            columns=8,
            elem_id=f"{prefix}-{sign}",
            **influencer_style(),
        )
        for sign in ("positive", "negative")
    )


def influencer_style() -> dict:
    return dict(elem_classes=["pixelated", "influencers"], buttons=[], allow_preview=False, height=160)


def controls(page: Page, explorer: Explorer, names: list[str]) -> None:
    """The left column: seed, prompt (text models), sampler steps, top-k, method, Generate, the image."""
    text_model = explorer.model.latent is not None  # a latent text-to-image pipeline
    captions = explorer.index()[1].train_captions  # a training prompt shows the style
    with gr.Row():
        page.seed = gr.Number(value=0, label=f"seed (0 to {MAX_SEED})", scale=3)
        page.dice = gr.Button("random", scale=1, min_width=60)
    page.prompt = gr.Textbox(
        label="prompt",
        placeholder=f"e.g. {captions[0]}" if captions else None,
        visible=text_model,
        elem_id="prompt",
    )
    page.guidance = gr.Number(
        value=7.5 if text_model else 1.0,
        label="classifier-free guidance (1: none)",
        visible=text_model,
        elem_id="guidance",
    )
    page.steps = gr.Slider(MIN_STEPS, UI_MAX_STEPS, value=50, step=1, label="sampler steps", elem_id="steps")
    page.top_k = gr.Number(
        value=8, precision=0, label=f"top-k influencers (1 to {UI_MAX_TOP_K})", elem_id="top-k"
    )
    page.index_name = gr.Dropdown(names, value=names[0], label="method / index", visible=len(names) > 1)
    page.go = gr.Button("Generate", variant="primary", elem_id="generate")
    page.final = gr.Image(
        label="generated image",
        height=IMAGE_PX + 40,
        interactive=False,
        elem_classes=["pixelated"],
        buttons=["download"],
    )


def step_area(page: Page) -> None:
    """Progress, status, the trajectory strip, the step slider, the step line beside Export, the step view
    (frames, influencer tiles, note, legend) beside the likelihood and influencer-class plot."""
    page.progress = gr.Markdown("", elem_id="progress")  # the progress overlay lands here, not on the status
    page.status = gr.Markdown(
        "Click **Generate** to sample a digit and attribute every step.", elem_id="status"
    )
    page.strip = gr.Gallery(
        label="x_t along the trajectory (click to jump)",
        columns=STRIP_COUNT,
        rows=1,
        height=130,
        allow_preview=False,
        elem_classes=["pixelated", "strip"],
        buttons=[],
    )
    page.slider = gr.Slider(
        0,
        49,
        value=49,
        step=1,
        label="denoising step (0: pure noise; arrow keys step)",
        elem_id="step-slider",
    )
    with gr.Row(equal_height=True):
        line, page.scrub = scrub_view.components()
        page.export_button = gr.Button("Export this step (JSON, CSV, PNG)", scale=0, min_width=220)
    page.step_line = line
    with gr.Row():
        with gr.Column(scale=3, min_width=480):
            page.scrub.render()
        page.plot = gr.Plot(
            min_width=420,
            label="what the model is drawing, and who is influencing it",
            scale=1,
            elem_id="likelihood",
        )
    with gr.Row():
        page.export_note = gr.Markdown("", elem_id="export-note")
        page.exported = gr.File(
            label="exported", file_count="multiple", height=100, elem_id="exported", visible=False
        )


def panels(page: Page, names: list[str]) -> None:
    """The selected influencer, a second method, a region."""
    pixel = dict(elem_classes=["pixelated"], buttons=[], interactive=False)
    with gr.Row():
        page.chosen = gr.Image(label="selected influencer", height=LARGE_PX + 40, scale=1, **pixel)
        with gr.Column(scale=3):
            page.chosen_info = gr.Markdown(NO_INFLUENCER, elem_id="chosen-info")
            page.chosen_plot = gr.Plot(label="when did this image matter?")
    with gr.Accordion("Compare with another method", open=False, visible=len(names) > 1):
        page.compare_index = gr.Dropdown(
            [("none", ""), *((n, n) for n in names)], value="", label="second method", elem_id="compare-index"
        )
        page.compare_info = gr.Markdown(NO_COMPARISON, elem_id="compare-info")
        page.compare_positive, page.compare_negative = gallery_pair("its", "compare")
    with gr.Accordion("Region: attribute part of the image", open=False):
        with gr.Row():
            page.region_image = gr.Image(
                label="click two corners of a box",
                show_label=False,  # a label would cover the top-left corner's pixels
                height=IMAGE_PX + 40,
                elem_id="region-image",
                **pixel,
            )
            with gr.Column(scale=3):
                page.region_box = gr.Textbox(
                    label="box x0,y0,x1,y1 (model pixels, x1 and y1 exclusive)", elem_id="region-box"
                )
                page.region_button = gr.Button("Attribute region", elem_id="region-button")
                page.region_info = gr.Markdown(NO_REGION, elem_id="region-info")
        page.region_positive, page.region_negative = gallery_pair("the region's", "region")
    page.sign, page.rank = gr.Textbox(visible=False), gr.Number(visible=False, precision=0)


def build(explorer: Explorer) -> gr.Blocks:
    """The explorer page: 'Generate & scrub', 'Attribute an image' and 'Bias & memorization' tabs."""
    h, page = Handlers(explorer), Page()
    names = list(explorer.indexes)
    with gr.Blocks(title="Diffusion Attribution Explorer") as demo:
        gr.Markdown(
            "## Diffusion Attribution Explorer\nWhich training images made this generated image, "
            "and **at which denoising step** did they matter? Generate a digit, then scrub the steps."
        )
        page.session = gr.State(None, time_to_live=SESSION_TTL_S)
        with gr.Tab("Generate & scrub"):
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    controls(page, explorer, names)
                with gr.Column(scale=5):
                    step_area(page)
                    panels(page, names)
        image_tab(page, h, explorer, names)
        insight_tab(page, h, explorer.indexes[names[0]])
        wire_generate(page, h, demo)
        wire_step(page, h)
        gr.api(h.attribute_trajectory, api_name="attribute_trajectory", concurrency_id="engine")
    return demo


def wire_generate(page: Page, h: Handlers, demo: gr.Blocks) -> None:
    """Generate and deep links make a new session; what follows a new session fires on its change, so a
    refused Generate (no new session) starts nothing and its message stays. A new Generate cancels the old
    session's completions."""
    engine = dict(concurrency_id="engine", postprocess=False, **UI)
    follow = dict(show_progress="hidden", concurrency_limit=4, postprocess=False, **UI)
    completions = page.session.change(
        h.rollouts,
        [page.session],
        page.group(RolloutOutputs),
        api_name="rollouts",
        show_progress="minimal",
        show_progress_on=[page.progress],
        **engine,
    )
    page.session.change(h.region_reset, [page.session], page.group(RegionReset), **follow)
    page.session.change(
        h.follow_step, [page.session, page.slider, page.compare_index], page.group(FollowOutputs), **follow
    )
    page.dice.click(h.random_seed, None, page.seed, api_name="random_seed", queue=False, **UI)
    controls = [page.seed, page.steps, page.top_k, page.index_name, page.prompt, page.guidance]
    stop = page.go.click(h.stop_completions, [page.session], None, queue=False, cancels=[completions], **UI)
    stop.then(
        h.generate,
        [page.session, *controls],
        page.group(GenerateOutputs),
        api_name="generate",
        show_progress_on=[page.progress],  # the progress has its own line: the status stays readable
        **engine,
    )
    demo.load(  # a link with ?seed=..&steps=..&step=.. reproduces that view
        h.open_link,
        None,
        page.group(LinkOutputs),
        api_name="open_link",
        show_progress_on=[page.progress],
        **engine,
    )
    for trigger, name in (
        (page.index_name.change, "reattribute_index"),
        (page.top_k.submit, "reattribute_top_k"),
    ):
        changed = trigger(
            h.reattribute,
            [page.session, page.slider, page.index_name, page.top_k],
            page.group(ReattributeOutputs),
            api_name=name,
            **engine,
        )
        changed.success(
            h.follow_step,
            [page.session, page.slider, page.compare_index],
            page.group(FollowOutputs),
            **follow,
        )


def wire_step(page: Page, h: Handlers) -> None:
    """The step slider moves the step view in the browser (no server call); the server hears the step for the
    panels that follow it, for Export, a tile's click and the strip."""
    page.slider.change(None, [page.slider], None, js=SHOW_STEP_JS, queue=False, trigger_mode="multiple")
    follow = dict(show_progress="hidden", concurrency_limit=4, postprocess=False, **UI)
    page.slider.change(
        h.follow_step,
        [page.session, page.slider, page.compare_index],
        page.group(FollowOutputs),
        api_name="follow_step",
        trigger_mode="always_last",
        **follow,
    )
    page.scrub.select(
        h.select_tile,
        [page.session, page.slider],
        page.group(ChosenOutputs),
        api_name="select_tile",
        **follow,
    )
    page.strip.select(h.jump, [page.session], page.slider, api_name="jump", show_progress="hidden", **UI)
    page.export_button.click(
        h.export, [page.session, page.slider], page.group(ExportOutputs), api_name="export_step", **UI
    )
    page.compare_index.change(
        h.compare,
        [page.session, page.slider, page.compare_index],
        page.group(CompareOutputs),
        api_name="compare",
        concurrency_id="engine",
        postprocess=False,
        **UI,
    )
    page.region_image.select(h.region_click, [page.session], page.group(RegionClick), **follow)
    for trigger, name in ((page.region_button.click, "region"), (page.region_box.submit, "region_submit")):
        shown = trigger(
            h.region,
            [page.session, page.slider, page.region_box],
            page.group(RegionOutputs),
            api_name=name,
            concurrency_id="engine",
            postprocess=False,
            **UI,
        )
        shown.success(
            h.region_fill, [page.session], None, concurrency_id="engine", show_progress="hidden", **UI
        )
    # one influencer's panel by sign and rank, for scripts and tests (the page's tiles send a select event);
    # the hidden box never submits on the page
    page.sign.submit(
        h.select_influencer,
        [page.session, page.slider, page.sign, page.rank],
        page.group(ChosenOutputs),
        api_name="select_influencer",
        postprocess=False,
        **UI,
    )
