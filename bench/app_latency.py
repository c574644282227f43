"""Latency of the web app on the shipped default: start-up, generate, scrubbing in Chromium, completions.

    python bench/app_latency.py                     # assets/model + assets/index
    python bench/app_latency.py --model M --index I --scrubs 100

Starts `python app.py` in a subprocess with gradio's request profiling on (GRADIO_PROFILING=1) and drives it
with gradio_client and with Debian's Chromium (Playwright). It prints:
- start-up: seconds from process start until the page is served;
- generate (50 steps, every step attributed, sent to the page at once): the handler's time on the server;
- scrubbing, end to end in Chromium: from the keydown on the step slider to the changed positive gallery
  (the DOM) and to the next frame after it, over --scrubs key presses (ArrowLeft/ArrowRight across the
  steps); DOM nodes (Chromium's counter after garbage collection, detached nodes included), event listeners
  and the JS heap before and after them;
- completions (12 steps x 16 completions): server-side time;
- region: a new box at the step on screen (what the page waits for), the rest of its steps (in the
  background), and the server's follow-up per slider move with the region shown.
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
sys.path.insert(0, str(ROOT))
from bench.screenshot import CHROMIUM_ARGS  # noqa: E402  (the tests' and screenshots' offline flags)

TARGETS = {"scrub_median_ms": 50.0, "scrub_p95_ms": 100.0, "generate_s": 5.0, "region_first_s": 3.0}
# In the page: the time of each keydown on the step slider, and of the first change of the positive gallery
# after it (DOM) and of the next animation frame (paint); the step view updates the gallery in place.
INSTRUMENT_JS = """() => {
    window.__scrub = {dom: [], frame: [], t0: null};
    document.addEventListener('keydown', (e) => {
        if (e.target.matches('#step-slider input[type=range]')) window.__scrub.t0 = performance.now();
    }, true);
    new MutationObserver(() => {
        const s = window.__scrub, t0 = s.t0;
        if (t0 === null) return;
        s.t0 = null;
        s.dom.push(performance.now() - t0);
        requestAnimationFrame(() => s.frame.push(performance.now() - t0));
    }).observe(document.querySelector('#positive .dax-grid'),
               {subtree: true, childList: true, characterData: true, attributes: true});
}"""


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


def counters(cdp) -> dict:
    """The page's elements, Chromium's DOM counters after a garbage collection (nodes: text and detached
    ones too) and the JS heap in MB."""
    cdp.send("HeapProfiler.collectGarbage")
    dom = cdp.send("Memory.getDOMCounters")
    heap = cdp.send("Runtime.getHeapUsage")["usedSize"] / 2**20
    elements = cdp.send("Runtime.evaluate", {"expression": "document.getElementsByTagName('*').length"})
    return {
        "elements": elements["result"]["value"],
        "nodes": dom["nodes"],
        "listeners": dom["jsEventListeners"],
        "js_heap_mb": round(heap, 1),
    }


def browser_scrub(url: str, scrubs: int, chromium: str) -> dict:
    """Generate in Chromium, wait for the completions, then press ArrowLeft/ArrowRight on the step slider
    `scrubs` times (sweeping across the steps), each time until the positive gallery changed."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.set_default_timeout(180_000)
        page.goto(url)
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.includes('completions (')"
        )
        page.evaluate(INSTRUMENT_JS)
        cdp = page.context.new_cdp_session(page)
        before = counters(cdp)
        slider = page.locator("#step-slider input[type=range]")
        slider.focus()
        step, last, key = int(slider.input_value()), int(slider.get_attribute("max")), "ArrowLeft"
        for done in range(1, scrubs + 1):
            if (key == "ArrowLeft" and step == 0) or (key == "ArrowRight" and step == last):
                key = "ArrowRight" if key == "ArrowLeft" else "ArrowLeft"
            page.keyboard.press(key)
            step += -1 if key == "ArrowLeft" else 1
            page.wait_for_function("n => window.__scrub.frame.length >= n", arg=done)
        timings = page.evaluate("() => window.__scrub")
        after = counters(cdp)
        browser.close()
    return {
        "scrub_dom_ms": summary(timings["dom"]),
        "scrub_frame_ms": summary(timings["frame"]),
        "before": before,
        "after": after,
    }


def region_latency(client, url: str, box: str, steps: list[int]) -> dict:
    """A new box: the step on screen (what the page waits for), then the rest in the background, then the
    server's follow-up per slider move (the region's lists among the panels that follow the slider)."""
    started = time.perf_counter()
    out = client.predict(steps[0], box, api_name="/region")
    round_trip = time.perf_counter() - started
    assert "also in the whole image's lists" in out[3], out[3]
    first = traces(url, "region")[-1]["total_ms"] / 1e3
    client.predict(api_name="/region_fill")
    rest = traces(url, "region_fill")[-1]["total_ms"] / 1e3
    for step in steps:
        out = client.predict(step, "", api_name="/follow_step")
        assert f"at step {step} " in out[-1], out[-1]
    follow = [trace["total_ms"] for trace in traces(url, "follow_step")[-len(steps) :]]
    print(
        f"region {box}: first box at the step on screen {first:.2f} s (round trip {round_trip:.2f} s), the "
        f"other steps {rest:.2f} s in the background; following the slider ({len(steps)}): server-side "
        f"median {statistics.median(follow):.1f} ms, p95 {percentile(follow, 95):.1f} ms"
    )
    return {
        "region": box,
        "region_first_s": round(first, 3),
        "region_rest_s": round(rest, 3),
        "region_follow_ms": summary(follow),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="assets/model")
    parser.add_argument("--index", default="assets/index")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scrubs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default="bench/results/app_latency.json")
    parser.add_argument("--region", default="0,0,16,8", help="box of the region view (the top half of 16 px)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    from gradio_client import Client

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
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
    process = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, GRADIO_PROFILING="1"))
    try:
        startup_s = wait_for_page(url, process, timeout_s=180)
        print(f"start-up: page served {startup_s:.1f} s after `{' '.join(command[1:])}` started")
        client = Client(url, verbose=False, download_files=False)
        measured = generate_latency(client, url, args)
        browser = browser_scrub(url, args.scrubs, args.chromium)
        frame, dom, before, after = (
            browser[k] for k in ("scrub_frame_ms", "scrub_dom_ms", "before", "after")
        )
        print(
            f"scrubbing in Chromium ({args.scrubs} key presses): keydown to changed gallery median "
            f"{dom['p50']} ms, p95 {dom['p95']} ms; to the next frame median {frame['p50']} ms, p95 "
            f"{frame['p95']} ms; DOM nodes {before['nodes']} -> {after['nodes']}, listeners "
            f"{before['listeners']} -> {after['listeners']}, JS heap {before['js_heap_mb']} -> "
            f"{after['js_heap_mb']} MB"
        )
        steps = random.Random(0).sample(range(args.steps), 20)
        region = region_latency(client, url, args.region, steps)
        checks = [
            (
                f"scrub median <= {TARGETS['scrub_median_ms']:.0f} ms",
                frame["p50"] <= TARGETS["scrub_median_ms"],
            ),
            (f"scrub p95 <= {TARGETS['scrub_p95_ms']:.0f} ms", frame["p95"] <= TARGETS["scrub_p95_ms"]),
            (
                f"generate (warm) <= {TARGETS['generate_s']:.0f} s",
                measured["generate_s"]["warm"] <= TARGETS["generate_s"],
            ),
            (
                f"region first box <= {TARGETS['region_first_s']:.0f} s",
                region["region_first_s"] <= TARGETS["region_first_s"],
            ),
        ]
        print("targets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in checks))
        result = {
            "command": "python bench/app_latency.py" + "".join(f" {a}" for a in sys.argv[1:]),
            "machine": machine_note(),
            "startup_s": round(startup_s, 2),
            **measured,
            "scrubs": args.scrubs,
            **browser,
            **region,
            "targets": {name: ok for name, ok in checks},
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    finally:
        process.terminate()
        process.wait(timeout=30)


def machine_note() -> str:
    """CPUs and the 1-minute load average when the run ended (other processes slow every figure)."""
    return f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end of the run"


def generate_latency(client, url: str, args) -> dict:
    """Generate twice (cold, warm) and the completions after each: server-side seconds."""
    (menu,) = [c for c in client.config["components"] if c.get("props", {}).get("label") == "method / index"][
        :1
    ]
    index_name = menu["props"]["value"]  # the method menu's default: the first --index
    generate, completions = {}, {}
    for label, seed in (("cold", args.seed), ("warm", args.seed + 1)):
        out = client.predict(seed, args.steps, 8, index_name, "", 1.0, api_name="/generate")
        generate[label] = traces(url, "generate")[-1]["fn_call_ms"] / 1e3
        document = json.loads(out[3])
        assert len(document["steps"]) == args.steps and len(document["steps"][0]["positive"]) == 8, (
            "no step view"
        )
        client.predict(api_name="/rollouts")
        completions[label] = traces(url, "rollouts")[-1]["total_ms"] / 1e3
        print(
            f"generate ({label}, seed {seed}, {args.steps} steps): server handler {generate[label]:.2f} s; "
            f"completions {completions[label]:.2f} s; step view {len(out[3]) / 1e3:.0f} kB"
        )
    return {
        "generate_s": _rounded(generate),
        "rollouts_s": _rounded(completions),
        "view_kb": round(len(out[3]) / 1e3),
    }


def _rounded(values: dict) -> dict:
    return {key: round(value, 3) for key, value in values.items()}


if __name__ == "__main__":
    main()
