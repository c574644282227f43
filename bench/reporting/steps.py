"""Per-step pages (issue 19): per-step quality of the served indexes, the per-step candidates, LDS on the
shipped model, and the served index against exact scores."""

from __future__ import annotations
