"""The web app's latency page: start-up, generate, rollouts, slider updates and the region view."""

from __future__ import annotations

from bench.reporting.core import commands, load, page, para, source_links, table

APP = "app_latency.json"


@page(
    "docs/benchmarks/app_latency.md",
    "Latency of the web app",
    "start-up, generate, rollout curves, slider updates and the region view on the shipped default",
    APP,
)
def app_latency() -> str:
    r = load(APP)
    rows = [
        ["start-up (page served)", f"{r['startup_s']:.1f} s", ""],
        *(
            [f"generate, {label} (server handler)", f"{seconds:.2f} s", ""]
            for label, seconds in r["generate_s"].items()
        ),
        *(
            [f"rollout curves, {label} (server)", f"{seconds:.2f} s", ""]
            for label, seconds in r["rollouts_s"].items()
        ),
        ["slider update (server-side total)", f"{r['scrub_ms']['p50']} ms", f"{r['scrub_ms']['p95']} ms"],
        [
            "slider update (handler alone)",
            f"{r['scrub_handler_ms']['p50']} ms",
            f"{r['scrub_handler_ms']['p95']} ms",
        ],
        [
            f"region {r['region']}: attribute every step (once per box)",
            f"{r['region_attribute_s']:.2f} s",
            "",
        ],
        [
            "region lists following the slider (server-side)",
            f"{r['region_scrub_ms']['p50']} ms",
            f"{r['region_scrub_ms']['p95']} ms",
        ],
    ]
    return "\n\n".join(
        [
            para(f"""`bench/app_latency.py` starts `python app.py` on the shipped default with gradio's
            request profiling on and drives it with gradio_client. Server-side times are gradio's trace totals
            (preprocess + handler + postprocess; no queue wait, no transport), over {r["scrub_ms"]["n"]}
            slider updates to distinct steps. A region is attributed once per box: its query is centered by
            the region output's own mean training feature, estimated once per box and bucket
            (explorer.region), then every step is a lookup like the whole image's."""),
            commands(r["command"]),
            table(["what", "median (or once)", "p95"], rows),
            f"Results: {source_links([APP])}.",
        ]
    )
