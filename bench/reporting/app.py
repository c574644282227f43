"""The web app's latency page: start-up, generate, scrubbing in Chromium, completions and the region view."""

from __future__ import annotations

from bench.reporting.core import commands, load, page, para, source_links, table

APP = "app_latency.json"


@page(
    "docs/benchmarks/app_latency.md",
    "Latency of the web app",
    "start-up, generate, scrubbing end to end in Chromium (and the page's DOM after it), completions and the "
    "region view on the shipped default",
    APP,
)
def app_latency() -> str:
    r = load(APP)
    before, after = r["before"], r["after"]
    rows = [
        ["start-up (page served)", f"{r['startup_s']:.1f} s", ""],
        *(
            [f"generate, {label} (server handler; every step attributed)", f"{seconds:.2f} s", ""]
            for label, seconds in r["generate_s"].items()
        ),
        ["the step view sent at Generate (all 50 steps)", f"{r['view_kb']} kB", ""],
        [
            "scrub: keydown on the slider to the changed gallery (Chromium)",
            f"{r['scrub_dom_ms']['p50']} ms",
            f"{r['scrub_dom_ms']['p95']} ms",
        ],
        [
            "scrub: keydown to the next frame after it",
            f"{r['scrub_frame_ms']['p50']} ms",
            f"{r['scrub_frame_ms']['p95']} ms",
        ],
        *(
            [f"completions, {label} (server; 12 steps x 16)", f"{seconds:.2f} s", ""]
            for label, seconds in r["rollouts_s"].items()
        ),
        [f"region {r['region']}: a new box at the step on screen", f"{r['region_first_s']:.2f} s", ""],
        ["region: its other steps (in the background)", f"{r['region_rest_s']:.2f} s", ""],
        [
            "server follow-up per slider move, region shown",
            f"{r['region_follow_ms']['p50']} ms",
            f"{r['region_follow_ms']['p95']} ms",
        ],
    ]
    dom = [
        [
            name,
            before[key],
            after[key],
        ]
        for name, key in (
            ("elements in the page", "elements"),
            ("DOM nodes (text nodes and detached ones too)", "nodes"),
            ("event listeners", "listeners"),
            ("JS heap (MB)", "js_heap_mb"),
        )
    ]
    targets = "; ".join(f"{name}: {'met' if ok else 'missed'}" for name, ok in r["targets"].items())
    return "\n\n".join(
        [
            para(f"""`bench/app_latency.py` starts `python app.py` on the shipped default with gradio's
            request profiling on, drives it with gradio_client and with Debian's Chromium (Playwright).
            Generate sends every step's influencer tiles, captions, frames and notes to the page once
            (explorer/web/scrub_view.py); the step slider then switches steps in the browser. A scrub is timed
            in the page, from the keydown on the slider to the change of the positive gallery and to the next
            animation frame, over {r["scrubs"]} key presses sweeping across the steps. Server-side times are
            gradio's trace totals. A new region box is attributed at the step on screen first (one bucket's
            region center, explorer.region), then at its other steps in one batch while the page shows the
            first. Machine: {r["machine"]}."""),
            commands(r["command"]),
            table(["what", "median (or once)", "p95"], rows),
            para(
                f"The page before and after the {r['scrubs']} scrubs (Chromium's counters after a garbage "
                "collection; detached nodes count too):"
            ),
            table(["", "before", "after"], dom),
            para(f"Targets: {targets}."),
            f"Results: {source_links([APP])}.",
        ]
    )
