"""Influencer galleries (gr.Gallery values) for the views that still use them: compare, region, the upload
tab and the Bias & memorization tab. Thumbnails are encoded once per training row and shared by sessions."""

from __future__ import annotations

from explorer.attribution import StepAttribution
from explorer.index import AttributionIndex, SearchResult
from explorer.web import plots
from explorer.web.payloads import gallery_payload
from explorer.web.rows import caption, influencer_rows

THUMB_PX = 112  # influencer thumbnails in a gallery


class Galleries:
    """Thumbnails (PNG data URIs) cached per (index, row), at gallery size and at the model's resolution."""

    def __init__(self):
        self._cache: dict[tuple[int, int, int], str] = {}

    def thumbnail(self, index: AttributionIndex, position: int, size: int = THUMB_PX) -> str:
        key = (id(index), position, size)
        if key not in self._cache:
            self._cache[key] = plots.png_data_uri(plots.upscale(index.train_images[position], size))
        return self._cache[key]

    def pixels(self, index: AttributionIndex, position: int) -> str:
        """The training image at its own resolution (the step view scales it up with CSS)."""
        return self.thumbnail(index, position, 0)

    def gallery(self, index: AttributionIndex, step: StepAttribution, result: SearchResult) -> list[dict]:
        """One list (step.positive or step.negative) as a gallery value, captioned as the step view does."""
        sign = "positive" if result is step.positive else "negative"
        rows = [row for row in influencer_rows(index, step) if row["sign"] == sign]
        items = [(self.thumbnail(index, r["row"]), caption(r, index.score_name)) for r in rows]
        return gallery_payload(items)

    def pair(self, index: AttributionIndex, step: StepAttribution) -> tuple[list[dict], list[dict]]:
        """(positive gallery, negative gallery) of one step."""
        return self.gallery(index, step, step.positive), self.gallery(index, step, step.negative)
