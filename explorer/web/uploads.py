"""Checks of an uploaded query image before it is attributed: large enough to mean anything, and drawn with
the training images' polarity (MNIST digits are light strokes on black; a black digit on white would
otherwise be attributed to the images that are mostly white, the 0s, with no warning)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple

import gradio.utils as gr_utils
import numpy as np
from PIL import Image, UnidentifiedImageError

from explorer.data import load_image_file
from explorer.errors import ExplorerError, bounded, whole_number
from explorer.memory import releases_memory
from explorer.web import plots
from explorer.web.payloads import holds_engine, image_payload, refused
from explorer.web.session import UI_MAX_TOP_K

logger = logging.getLogger("explorer.web.handlers")
MIN_UPLOAD_PX = 8  # smaller uploads are refused: upscaled to the model's size they are a few flat blocks
DARK, LIGHT = 0.35, 0.65  # a border mean (0..1) below DARK is a dark background, above LIGHT a light one
CONSISTENT = 0.9  # share of training images whose background must agree before an upload is flipped


def upload_size(path: str) -> tuple[int, int]:
    """(width, height) of an uploaded file, refused under MIN_UPLOAD_PX on a side (unreadable files are named
    by the loader that follows)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError):
        return 0, 0  # not an image: explorer.data.load_image_file names the file
    if min(width, height) < MIN_UPLOAD_PX:
        raise ExplorerError(
            f"image {Path(path).name!r} is {width}x{height} px: upload one at least "
            f"{MIN_UPLOAD_PX}x{MIN_UPLOAD_PX} px"
        )
    return width, height


def border_brightness(images: np.ndarray) -> np.ndarray:
    """(n,) mean of each uint8 image's one-pixel border, in 0..1 (images (n, H, W) or (n, H, W, C))."""
    edges = [images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]]
    return np.concatenate([e.reshape(len(images), -1) for e in edges], axis=1).mean(1) / 255.0


def training_background(train_images: np.ndarray) -> str | None:
    """'dark' or 'light' when CONSISTENT of the training images share that background, else None."""
    border = border_brightness(train_images)
    if (border < DARK).mean() >= CONSISTENT:
        return "dark"
    if (border > LIGHT).mean() >= CONSISTENT:
        return "light"
    return None


def match_polarity(image: np.ndarray, background: str | None) -> tuple[np.ndarray, str]:
    """The upload (uint8, the model's size) flipped (255 - x) when its background is the opposite of the
    training images', and a note saying so ("" when it was left as it is)."""
    border = float(border_brightness(image[None])[0])
    if background == "dark" and border > LIGHT:
        seen = "a light background"
    elif background == "light" and border < DARK:
        seen = "a dark background"
    else:
        return image, ""
    return 255 - image, (
        f"inverted: the upload has {seen} and the training images a {background} one, so it was flipped "
        "(upload it the training images' way round to skip this)"
    )


class ImageOutputs(NamedTuple):
    seen: object
    image_positive: object
    image_negative: object
    image_status: object


class ImageHandlers:
    """The Attribute-an-image tab's handler (mixed into explorer.web.handlers.Handlers)."""

    explorer: object
    galleries: object
    _backgrounds: dict

    @releases_memory
    def attribute_image(self, image, timestep, top_k, index_name, prompt=None) -> ImageOutputs:
        """An uploaded image (any size or mode) as the query at one timestep, with a text model's prompt; a
        refused upload clears the earlier results, so they are never taken for this image's."""
        try:
            return self._attribute_image(image, timestep, top_k, index_name, prompt)
        except ExplorerError as error:
            logger.info("user error in attribute_image: %s", error)
            return ImageOutputs(
                None, [], [], refused(error).replace("Everything else on the page is as it was.", "")
            )

    @holds_engine
    def _attribute_image(self, image, timestep, top_k, index_name, prompt) -> ImageOutputs:
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
        model, index = self.explorer.model, self._index(index_name)
        try:
            upload_size(path)
            array = load_image_file(path, model.image_size, model.image_channels)
        except ExplorerError as error:  # name the upload, not the server's temporary path
            raise ExplorerError(str(error).replace(path, Path(path).name)) from None
        if id(index) not in self._backgrounds:
            self._backgrounds[id(index)] = training_background(index.train_images)
        array, flipped = match_polarity(array, self._backgrounds[id(index)])
        timestep = whole_number(timestep, "timestep", 0, model.num_train_timesteps - 1)
        top_k, note = bounded(top_k, "top-k", 1, UI_MAX_TOP_K)
        started = time.perf_counter()
        step = self.explorer.attribute_image(array, timestep, index_name, top_k, prompt=prompt or None)
        status = " · ".join(
            [
                f"t = {timestep} (bucket {step.bucket}) · top-{top_k} · {step.negatives_note()}",
                f"attributed in {time.perf_counter() - started:.2f} s",
                *(text for text in (note, flipped) if text),
            ]
        )
        seen = image_payload(plots.png_data_uri(plots.upscale(array, plots.IMAGE_PX)))
        return ImageOutputs(seen, *self.galleries.pair(index, step), status)
