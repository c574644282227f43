"""The 'Attribute an image' and 'Bias & memorization' tabs: layout and wiring (the handlers are in
handlers.py and insight.py). Their components join the page by name, like the Generate tab's (ui.Page)."""

import gradio as gr

from explorer.index import AttributionIndex
from explorer.web.handlers import IMAGE_PX, UI_MAX_TOP_K
from explorer.web.insight import ALL_BUCKETS, BiasOutputs, CopyOutputs, SelfOutputs, bucket_choices
from explorer.web.uploads import ImageOutputs

UI = dict(api_visibility="undocumented")  # the page's events: callable, not on the API page


def influencers(label: str, elem_id: str | None = None) -> gr.Gallery:
    return gr.Gallery(
        label=label,
        columns=8,
        elem_id=elem_id,
        elem_classes=["pixelated", "influencers"],
        buttons=[],
        allow_preview=False,
        height=160,
    )


def image_tab(page, h, explorer, names: list[str]) -> None:
    """Upload an image, pick a timestep, see its influencers."""
    T = explorer.model.num_train_timesteps
    with gr.Tab("Attribute an image"):
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                upload = gr.Image(
                    type="filepath",
                    label="query image (at least 8x8 px, any mode; resized to the model's size)",
                    sources=["upload", "clipboard"],
                    height=240,
                )
                timestep = gr.Slider(
                    0, T - 1, value=T // 10, step=1, label=f"train timestep t (0 to {T - 1})"
                )
                prompt = gr.Textbox(
                    label="its prompt", visible=explorer.model.latent is not None, elem_id="image-prompt"
                )
                top_k = gr.Number(value=8, precision=0, label=f"top-k influencers (1 to {UI_MAX_TOP_K})")
                index = gr.Dropdown(names, value=names[0], label="method / index", visible=len(names) > 1)
                button = gr.Button("Attribute", variant="primary")
                page.seen = gr.Image(
                    label="what the model sees",
                    height=IMAGE_PX + 40,
                    elem_id="seen",
                    elem_classes=["pixelated"],
                    buttons=[],
                    interactive=False,
                )
            with gr.Column(scale=4):
                page.image_status = gr.Markdown(
                    "Upload an image, pick a timestep, click **Attribute**.", elem_id="image-status"
                )
                page.image_positive = influencers("top positive influencers", "image-positive")
                page.image_negative = influencers(
                    "top negative influencers (least aligned where fewer are negative)", "image-negative"
                )
    # preprocess=False: the handler reads the upload itself, so a corrupt file gets a clear message
    button.click(
        h.attribute_image,
        [upload, timestep, top_k, index, prompt],
        page.group(ImageOutputs),
        api_name="attribute_image",
        preprocess=False,
        concurrency_id="engine",
        postprocess=False,
        **UI,
    )


def insight_tab(page, h, first: AttributionIndex) -> None:
    """Per-bucket gradient norms and top-k concentration, self-influence, the generated image's copies."""
    with gr.Tab("Bias & memorization") as tab:
        gr.Markdown(
            "Per timestep bucket: how large the training gradients are, and how often the same few "
            "images top many queries' lists with raw vs normalized scores (Diffusion-ReTrac's timestep "
            "bias). Below: training images ranked by self-influence, and the generated image's nearest "
            "training images (updated after each Generate)."
        )
        page.bias_plot = gr.Plot(label="timestep bias", elem_id="bias-plot")
        page.bias_note = gr.Markdown("", elem_id="bias-note")
        bucket = gr.Dropdown(
            bucket_choices(first), value=ALL_BUCKETS, label="self-influence at", elem_id="self-bucket"
        )
        page.self_note = gr.Markdown("", elem_id="self-note")
        page.self_high = influencers(
            "highest self-influence: outliers, mislabelled or memorized candidates", "self-high"
        )
        page.self_low = influencers("lowest self-influence: the most typical images", "self-low")
        page.copy_info = gr.Markdown("Generate a digit first.", elem_id="copy-info")
        page.copy_pixel = influencers("nearest training images in pixels", "copy-pixel")
        page.copy_feature = influencers(
            "nearest in feature space: the last step's top positives", "copy-feature"
        )
    engine = dict(concurrency_id="engine", postprocess=False, **UI)
    follow = dict(show_progress="hidden", concurrency_limit=4, postprocess=False, **UI)
    tab.select(h.bias, [page.index_name], page.group(BiasOutputs), api_name="bias", **engine)
    selves = dict(inputs=[page.index_name, bucket], outputs=page.group(SelfOutputs))
    tab.select(h.self_influence, **selves, api_name="self_influence_tab", **follow)
    bucket.change(h.self_influence, **selves, api_name="self_influence", **follow)
    page.session.change(
        h.near_copies, [page.session], page.group(CopyOutputs), api_name="near_copies", **follow
    )
