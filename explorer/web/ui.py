"""The Gradio web UI: generate a digit, scrub the denoising steps, watch influencers and likelihoods.

`build(explorer)` lays out the page and wires every event (each with an explicit api_name) to
the handlers in handlers.py; `launch` serves it offline (system fonts, no analytics, no
server-side rendering). Only this package (ui.py, handlers.py, plots.py) imports gradio or plotly.
"""

import gradio as gr

from explorer.attribution import Explorer
from explorer.sampler import MAX_SEED, MIN_STEPS
from explorer.web.compare import NO_COMPARISON
from explorer.web.handlers import IMAGE_PX, LARGE_PX, NO_INFLUENCER, STRIP_COUNT, UI_MAX_TOP_K, Handlers
from explorer.web.insight import ALL_BUCKETS, bucket_choices
from explorer.web.region import NO_REGION

UI_MAX_STEPS = 200  # sampler steps offered by the slider (the engine accepts up to 1000)
SESSION_TTL_S = 3600  # a session's generation is freed an hour after it last changed (bench/load.py: memory)
CSS = """
.pixelated img { image-rendering: pixelated; }
.influencers .thumbnail-item { display: flex; flex-direction: column; height: auto; }
.influencers .thumbnail-item img { object-fit: contain; }
.block.influencers { height: auto !important; }  /* every row of tiles shows, however large top-k is */
.influencers .grid-wrap { height: auto !important; max-height: none !important; overflow: visible; }
.influencers .caption-label { position: static; white-space: normal; max-width: none; margin: 0;
                              padding: 1px 3px; font-size: 10px; line-height: 1.15; opacity: 1; }
#positive { border-left: 4px solid #2e7d32; }
#negative { border-left: 4px solid #c62828; }
.strip .grid-container { grid-template-columns: repeat(var(--grid-cols), minmax(48px, 1fr)); }
.strip .caption-label { font-size: 10px; }
"""


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


def gallery_pair(whose: str, prefix: str, options: dict) -> tuple[gr.Gallery, gr.Gallery]:
    """A view's positive and negative influencer galleries (#PREFIX-positive, #PREFIX-negative)."""
    return tuple(
        gr.Gallery(label=f"{whose} top {sign} influencers", columns=8, elem_id=f"{prefix}-{sign}", **options)
        for sign in ("positive", "negative")
    )


def build(explorer: Explorer) -> gr.Blocks:
    """The explorer page: a 'Generate & scrub' tab and an 'Attribute an image' tab."""
    h = Handlers(explorer)
    names = list(explorer.indexes)
    T = explorer.model.num_train_timesteps
    pixel = dict(elem_classes=["pixelated"], buttons=[], interactive=False)
    influencers = dict(elem_classes=["pixelated", "influencers"], buttons=[], allow_preview=False, height=160)
    with gr.Blocks(title="Diffusion Attribution Explorer") as demo:
        gr.Markdown(
            "## Diffusion Attribution Explorer\nWhich training images made this generated image, "
            "and **at which denoising step** did they matter? Generate a digit, then scrub the steps."
        )
        session = gr.State(None, time_to_live=SESSION_TTL_S)
        with gr.Tab("Generate & scrub"):
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    with gr.Row():
                        seed = gr.Number(value=0, label=f"seed (0 to {MAX_SEED})", scale=3)
                        dice = gr.Button("random", scale=1, min_width=60)
                    text_model = explorer.model.latent is not None  # a latent text-to-image pipeline
                    captions = explorer.index()[1].train_captions  # a training prompt shows the style
                    prompt = gr.Textbox(
                        label="prompt",
                        placeholder=f"e.g. {captions[0]}" if captions else None,
                        visible=text_model,
                        elem_id="prompt",
                    )
                    guidance = gr.Number(
                        value=7.5 if text_model else 1.0,
                        label="classifier-free guidance (1: none)",
                        visible=text_model,
                        elem_id="guidance",
                    )
                    steps = gr.Slider(
                        MIN_STEPS, UI_MAX_STEPS, value=50, step=1, label="sampler steps", elem_id="steps"
                    )
                    top_k = gr.Number(
                        value=8,
                        precision=0,
                        label=f"top-k influencers (1 to {UI_MAX_TOP_K})",
                        elem_id="top-k",
                    )
                    index_name = gr.Dropdown(
                        names, value=names[0], label="method / index", visible=len(names) > 1
                    )
                    go_button = gr.Button("Generate", variant="primary")
                    final = gr.Image(
                        label="generated image",
                        height=IMAGE_PX + 40,
                        interactive=False,
                        elem_classes=["pixelated"],
                        buttons=["download"],
                    )
                with gr.Column(scale=4):
                    status = gr.Markdown(
                        "Click **Generate** to sample a digit and attribute every step.", elem_id="status"
                    )
                    strip = gr.Gallery(
                        label="x_t along the trajectory (click to jump)",
                        columns=STRIP_COUNT,
                        rows=1,
                        height=130,
                        allow_preview=False,
                        elem_classes=["pixelated", "strip"],
                        buttons=[],
                    )
                    slider = gr.Slider(0, 49, value=49, step=1, label="denoising step", elem_id="step-slider")
                    step_info = gr.Markdown("")
                    with gr.Row():
                        xt = gr.Image(label="x_t", height=IMAGE_PX + 40, **pixel)
                        x0 = gr.Image(label="x0hat: one-step estimate", height=IMAGE_PX + 40, **pixel)
                        plot = gr.Plot(
                            label="feature likelihood p(class | x_t)", scale=3, elem_id="likelihood"
                        )
                    positive = gr.Gallery(
                        label="top positive influencers at this step (click one)",
                        columns=8,
                        elem_id="positive",
                        **influencers,
                    )
                    negative = gr.Gallery(
                        label="top negative influencers at this step (least aligned where fewer are "
                        "negative; click one)",
                        columns=8,
                        elem_id="negative",
                        **influencers,
                    )
                    with gr.Row():
                        chosen = gr.Image(label="selected influencer", height=LARGE_PX + 40, scale=1, **pixel)
                        with gr.Column(scale=3):
                            chosen_info = gr.Markdown(NO_INFLUENCER, elem_id="chosen-info")
                            chosen_plot = gr.Plot(label="when did this image matter?")
                    with gr.Accordion("Compare with another method", open=False, visible=len(names) > 1):
                        compare_index = gr.Dropdown(
                            [("none", ""), *((n, n) for n in names)],
                            value="",
                            label="second method",
                            elem_id="compare-index",
                        )
                        compare_info = gr.Markdown(NO_COMPARISON, elem_id="compare-info")
                        compare_positive, compare_negative = gallery_pair("its", "compare", influencers)
                    with gr.Accordion("Region: attribute part of the image", open=False):
                        with gr.Row():
                            region_image = gr.Image(
                                label="click two corners of a box",
                                show_label=False,  # a label would cover the top-left corner's pixels
                                height=IMAGE_PX + 40,
                                elem_id="region-image",
                                **pixel,
                            )
                            with gr.Column(scale=3):
                                region_box = gr.Textbox(
                                    label="box x0,y0,x1,y1 (model pixels, x1 and y1 exclusive)",
                                    elem_id="region-box",
                                )
                                region_button = gr.Button("Attribute region", elem_id="region-button")
                                region_info = gr.Markdown(NO_REGION, elem_id="region-info")
                        region_positive, region_negative = gallery_pair("the region's", "region", influencers)
                    with gr.Row():
                        export_button = gr.Button("Export this step (JSON, CSV, PNG)", scale=1)
                        exported = gr.File(
                            label="exported", file_count="multiple", scale=3, height=120, elem_id="exported"
                        )
                    sign = gr.Textbox(visible=False)
                    rank = gr.Number(visible=False, precision=0)
        with gr.Tab("Attribute an image"):
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    upload = gr.Image(
                        type="filepath",
                        label="query image (any size; resized to the model's)",
                        sources=["upload", "clipboard"],
                        height=240,
                    )
                    timestep = gr.Slider(
                        0, T - 1, value=T // 10, step=1, label=f"train timestep t (0 to {T - 1})"
                    )
                    image_prompt = gr.Textbox(label="its prompt", visible=text_model, elem_id="image-prompt")
                    image_top_k = gr.Number(
                        value=8, precision=0, label=f"top-k influencers (1 to {UI_MAX_TOP_K})"
                    )
                    image_index = gr.Dropdown(
                        names, value=names[0], label="method / index", visible=len(names) > 1
                    )
                    attribute_button = gr.Button("Attribute", variant="primary")
                    seen = gr.Image(
                        label="what the model sees", height=IMAGE_PX + 40, elem_id="seen", **pixel
                    )
                with gr.Column(scale=4):
                    image_status = gr.Markdown("Upload an image, pick a timestep, click **Attribute**.")
                    image_positive = gr.Gallery(label="top positive influencers", columns=8, **influencers)
                    image_negative = gr.Gallery(
                        label="top negative influencers (least aligned where fewer are negative)",
                        columns=8,
                        **influencers,
                    )

        with gr.Tab("Bias & memorization") as insight_tab:
            gr.Markdown(
                "Per timestep bucket: how large the training gradients are, and how often the same few "
                "images top many queries' lists with raw vs normalized scores (Diffusion-ReTrac's timestep "
                "bias). Below: training images ranked by self-influence, and the generated image's nearest "
                "training images (updated after each Generate)."
            )
            bias_plot = gr.Plot(label="timestep bias", elem_id="bias-plot")
            bias_note = gr.Markdown("", elem_id="bias-note")
            first = explorer.indexes[names[0]]
            self_bucket = gr.Dropdown(
                bucket_choices(first), value=ALL_BUCKETS, label="self-influence at", elem_id="self-bucket"
            )
            self_note = gr.Markdown("", elem_id="self-note")
            self_high = gr.Gallery(
                label="highest self-influence: outliers, mislabelled or memorized candidates",
                columns=8,
                elem_id="self-high",
                **influencers,
            )
            self_low = gr.Gallery(
                label="lowest self-influence: the most typical images",
                columns=8,
                elem_id="self-low",
                **influencers,
            )
            copy_info = gr.Markdown("Generate a digit first.", elem_id="copy-info")
            copy_pixel = gr.Gallery(
                label="nearest training images in pixels", columns=8, elem_id="copy-pixel", **influencers
            )
            copy_feature = gr.Gallery(
                label="nearest in feature space: the last step's top positives",
                columns=8,
                elem_id="copy-feature",
                **influencers,
            )

        # Handlers return serialized outputs (see handlers), hence postprocess=False; the heavy
        # engine calls share one queue ("engine") so they never oversubscribe the CPU together.
        view = [slider, xt, x0, positive, negative, plot, step_info]
        chosen_views = [chosen, chosen_plot, chosen_info]
        engine = dict(concurrency_id="engine", postprocess=False)
        dice.click(h.random_seed, None, seed, api_name="random_seed", queue=False)
        comparison = [compare_positive, compare_negative, compare_info]
        follow = dict(show_progress="hidden", concurrency_limit=4, postprocess=False)
        generated = go_button.click(
            h.generate,
            [seed, steps, top_k, index_name, prompt, guidance],
            [session, final, strip, *view, status, *chosen_views, top_k],
            api_name="generate",
            show_progress_on=[status],  # one place reports the stages, the rest of the page stays readable
            **engine,
        )
        generated.success(h.compare_scrub, [session, slider, compare_index], comparison, **follow)
        region_views = [region_image, region_box, region_positive, region_negative, region_info]
        region_lists = [region_positive, region_negative, region_info]
        copies = [copy_pixel, copy_feature, copy_info]
        generated.success(h.region_reset, [session], region_views, **follow)
        generated.success(h.highlight, [session], [positive, negative], show_progress="hidden", queue=False)
        generated.success(h.near_copies, [session], copies, api_name="near_copies", **follow)
        region_image.select(h.region_click, [session], [region_image, region_box, region_info], **follow)
        for trigger, name in ((region_button.click, "region"), (region_box.submit, "region_submit")):
            trigger(
                h.region,
                [session, slider, region_box],
                [region_image, region_positive, region_negative, region_info],
                api_name=name,
                **engine,
            )
        slider.change(
            h.region_scrub,
            [session, slider],
            region_lists,
            api_name="region_scrub",
            trigger_mode="always_last",
            **follow,
        )
        insight_tab.select(h.bias, [index_name], [bias_plot, bias_note], api_name="bias", **engine)
        insight_tab.select(
            h.self_influence, [index_name, self_bucket], [self_high, self_low, self_note], **follow
        )
        self_bucket.change(
            h.self_influence,
            [index_name, self_bucket],
            [self_high, self_low, self_note],
            api_name="self_influence",
            **follow,
        )
        generated.success(
            h.rollouts,
            [session],
            [plot, status],
            api_name="rollouts",
            show_progress="minimal",
            show_progress_on=[status],
            **engine,
        ).success(h.replot, [session], [plot], show_progress="hidden", postprocess=False)
        slider.change(
            h.scrub,
            [session, slider],
            [*view, *chosen_views],
            api_name="scrub",
            trigger_mode="always_last",
            show_progress="hidden",
            concurrency_limit=4,
            postprocess=False,
        ).success(h.highlight, [session], [positive, negative], show_progress="hidden", queue=False)
        for trigger, name in ((index_name.change, "reattribute_index"), (top_k.submit, "reattribute_top_k")):
            changed = trigger(
                h.reattribute,
                [session, slider, index_name, top_k],
                [session, *view, status, *chosen_views, top_k],
                api_name=name,
                **engine,
            )
            changed.success(h.compare_scrub, [session, slider, compare_index], comparison, **follow)
            changed.success(h.highlight, [session], [positive, negative], show_progress="hidden", queue=False)
            changed.success(h.region_scrub, [session, slider], region_lists, **engine)
        strip.select(h.jump, [session], slider, api_name="jump", show_progress="hidden")
        gr.on(
            [positive.select, negative.select],
            h.pick,
            None,
            [sign, rank],
            api_name="pick_influencer",
            show_progress="hidden",
        ).success(
            h.select_influencer,
            [session, slider, sign, rank],
            chosen_views,
            api_name="select_influencer",
            postprocess=False,
        ).success(  # the server's selected_index follows the click, so a later "none" is a change
            h.highlight, [session], [positive, negative], show_progress="hidden", queue=False
        )
        export_button.click(h.export, [session, slider], [exported, step_info], api_name="export_step")
        compare_index.change(
            h.compare, [session, slider, compare_index], comparison, api_name="compare", **engine
        )
        slider.change(
            h.compare_scrub,
            [session, slider, compare_index],
            comparison,
            api_name="compare_scrub",
            trigger_mode="always_last",
            **follow,
        )
        linked = demo.load(  # a link with ?seed=..&steps=..&step=.. reproduces that view
            h.open_link,
            None,
            [seed, steps, prompt, guidance, session, final, strip, *view, status, *chosen_views, top_k],
            api_name="open_link",
            show_progress_on=[status],
            **engine,
        )
        linked.success(
            h.rollouts_after_link,
            [session],
            [plot, status],
            api_name="rollouts_after_link",
            show_progress="minimal",
            show_progress_on=[status],
            **engine,
        ).success(h.replot, [session], [plot], show_progress="hidden", postprocess=False)
        linked.success(h.region_reset, [session], region_views, **follow)
        linked.success(h.near_copies, [session], copies, **follow)
        # preprocess=False too: the handler reads the upload itself, so a corrupt file gets a clear message
        attribute_button.click(
            h.attribute_image,
            [upload, timestep, image_top_k, image_index, image_prompt],
            [seen, image_positive, image_negative, image_status],
            api_name="attribute_image",
            preprocess=False,
            **engine,
        )
    return demo
