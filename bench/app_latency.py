"""Latency of the web app on the shipped default: start-up, generate, slider updates, rollout curves.

    python bench/app_latency.py                     # assets/model + assets/index
    python bench/app_latency.py --model M --index I --updates 20

Starts `python app.py` in a subprocess with gradio's request profiling on (GRADIO_PROFILING=1)
and drives it with gradio_client, like a browser would call the events. It prints:
- start-up: seconds from process start until the page is served;
- generate (50 steps, every step attributed, x0hat curve): the handler's time on the server,
  the engine's own split (sample / attribute / proxy), and the client's round trip;
- slider updates: server-side time per update, which is gradio's trace "total" (preprocess +
  handler + postprocess; not queue wait, not transport), its handler part, and the client's
  round trip (gradio_client adds its own SSE overhead), as median and p95;
- rollout curves (12 steps x 16 completions): server-side time and round trip;
- region attribution of the top half (once per box) and the region lists following the slider.
Writes the figures to --json (default bench/results/app_latency.json; docs/benchmarks/app_latency.md).
"""

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"slider_median_ms": 100.0, "generate_s": 5.0, "rollouts_s": 30.0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_page(url: str, process: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until GET url answers 200 (the page is served)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            raise SystemExit(
                f"app.py exited with status {process.returncode} before serving the page (see its log above)"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the page at {url} was not served within {timeout_s:.0f} s")


def traces(url: str, name: str) -> list[dict]:
    """Gradio's server-side request traces of one event (api_name), oldest first."""
    with urllib.request.urlopen(f"{url}gradio_api/profiling/traces", timeout=10) as response:
        return [trace for trace in json.load(response) if trace["fn_name"] == name]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict:
    return {
        "p50": round(statistics.median(values), 2),
        "p95": round(percentile(values, 95), 2),
        "n": len(values),
    }


def region_latency(client, url: str, box: str, steps: list[int]) -> dict:
    """The region view: attributing a box (every step, once per box) and its lists following the slider."""
    started = time.perf_counter()
    out = client.predict(steps[0], box, api_name="/region")
    round_trip = time.perf_counter() - started
    assert "also in the whole image's lists" in out[3], out[3]
    attribute = traces(url, "region")[-1]["total_ms"] / 1e3
    for step in steps:
        out = client.predict(step, api_name="/region_scrub")
        assert f"at step {step} " in out[2], out[2]
    follow = [trace["total_ms"] for trace in traces(url, "region_scrub")[-len(steps) :]]
    print(
        f"region: attribute {attribute:.2f} s (round trip {round_trip:.2f} s); region lists following the "
        f"slider ({len(steps)}): server-side median {statistics.median(follow):.1f} ms, p95 "
        f"{percentile(follow, 95):.1f} ms"
    )
    return {"region": box, "region_attribute_s": round(attribute, 3), "region_scrub_ms": summary(follow)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="assets/model")
    parser.add_argument("--index", default="assets/index")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default="bench/results/app_latency.json")
    parser.add_argument("--region", default="0,0,16,8", help="box of the region view (the top half of 16 px)")
    args = parser.parse_args()

    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    from gradio_client import Client

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_PROFILING="1")
    command = [
        sys.executable,
        str(ROOT / "app.py"),
        "--model",
        args.model,
        "--index",
        args.index,
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        startup_s = wait_for_page(url, process, timeout_s=180)
        print(f"start-up: page served {startup_s:.1f} s after `{' '.join(command[1:])}` started")
        client = Client(url, verbose=False, download_files=False)
        api = client.view_api(print_info=False, return_format="dict")
        index_name = api["named_endpoints"]["/generate"]["parameters"][3][
            "parameter_default"
        ]  # the dropdown's default

        measured: dict[str, float] = {}
        for label, seed in (("cold", args.seed), ("warm", args.seed + 1)):
            started = time.perf_counter()
            out = client.predict(seed, args.steps, 8, index_name, api_name="/generate")
            round_trip = time.perf_counter() - started
            handler = measured[f"generate_{label}"] = traces(url, "generate")[-1]["fn_call_ms"] / 1e3
            status = out[9]
            assert len(out[5]) == 8 and len(out[6]) == 8, "generate returned no galleries"
            print(
                f"generate ({label}, seed {seed}, {args.steps} steps): server handler {handler:.2f} s, "
                f"round trip {round_trip:.2f} s  [{status.split(' · ', 3)[3].split(' · rollout')[0]}]"
            )
            started = time.perf_counter()
            plot, status = client.predict(api_name="/rollouts")
            round_trip = time.perf_counter() - started
            server = measured[f"rollouts_{label}"] = traces(url, "rollouts")[-1]["total_ms"] / 1e3
            rollout_traces = [t for t in json.loads(plot["plot"])["data"] if t["line"].get("dash") == "dash"]
            assert rollout_traces and len(rollout_traces[0]["x"]) >= 10, "rollout curves missing"
            print(
                f"rollout curves ({label}; {len(rollout_traces[0]['x'])} steps x 16 completions): "
                f"server {server:.2f} s, round trip {round_trip:.2f} s"
            )

        steps = random.Random(0).sample(
            range(args.steps), args.updates
        )  # distinct steps: first visits, no reuse
        round_trips = []
        for step in steps:
            started = time.perf_counter()
            out = client.predict(step, api_name="/scrub")
            round_trips.append(1e3 * (time.perf_counter() - started))
            assert len(out[3]) == 8 and f"step {step} " in out[6], f"scrub to step {step} returned {out[6]!r}"
        scrubs = traces(url, "scrub")[-args.updates :]
        server = [trace["total_ms"] for trace in scrubs]
        handler = [trace["fn_call_ms"] for trace in scrubs]
        median = statistics.median(server)
        phases = ", ".join(
            f"{phase} {statistics.median(trace[phase + '_ms'] for trace in scrubs):.1f} ms"
            for phase in ("queue_wait", "preprocess", "fn_call", "postprocess")
        )
        print(
            f"slider updates ({args.updates}): server-side (gradio trace total: preprocess + handler + "
            "postprocess) "
            f"median {median:.1f} ms, p95 {percentile(server, 95):.1f} ms; handler alone median "
            f"{statistics.median(handler):.1f} ms; gradio_client round trip median "
            f"{statistics.median(round_trips):.1f} ms, "
            f"p95 {percentile(round_trips, 95):.1f} ms\n  median per phase: {phases}"
        )
        checks = [
            (
                f"slider update median <= {TARGETS['slider_median_ms']:.0f} ms",
                median <= TARGETS["slider_median_ms"],
            ),
            (
                f"generate (warm) <= {TARGETS['generate_s']:.0f} s",
                measured["generate_warm"] <= TARGETS["generate_s"],
            ),
            (
                f"rollout curves <= {TARGETS['rollouts_s']:.0f} s",
                max(measured["rollouts_cold"], measured["rollouts_warm"]) <= TARGETS["rollouts_s"],
            ),
        ]
        print("targets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in checks))
        region = region_latency(client, url, args.region, steps)
        result = {
            "command": "python bench/app_latency.py" + "".join(f" {a}" for a in sys.argv[1:]),
            "startup_s": round(startup_s, 2),
            "generate_s": {k[9:]: round(v, 3) for k, v in measured.items() if k.startswith("generate_")},
            "rollouts_s": {k[9:]: round(v, 3) for k, v in measured.items() if k.startswith("rollouts_")},
            "scrub_ms": summary(server),
            "scrub_handler_ms": summary(handler),
            **region,
            "targets": {name: ok for name, ok in checks},
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    finally:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
