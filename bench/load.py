"""Load test: N concurrent gradio_client sessions on 127.0.0.1, each generating and scrubbing.

Starts `python app.py` (the shipped default unless --model/--index are given) on a free local
port, runs the sessions in threads (bounded: --sessions, --scrubs per session, --timeout), checks
that every session sees only its own trajectory, and prints p50/p95 latencies, the error count and the
server's memory: its resident set before the first session, after all of them, and its peak (VmRSS, VmHWM of
/proc/PID/status), with the increase per session.

    python -m bench.load --sessions 8 --scrubs 20 --json bench/results/load.json
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import threading
import time

os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
from bench.app_latency import ROOT, free_port, percentile, wait_for_page

STEP_INFO = re.compile(r"step (\d+)")
SCRUB_STEP_INFO = 6  # /scrub's outputs: slider, x_t, x0hat, 2 galleries, plot, step line, then the selection


def server_memory_gb(pid: int) -> dict[str, float]:
    """The server process's resident set now and at its peak, in GB (Linux /proc)."""
    fields = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024**2  # kB -> GB
    return {"rss_gb": round(fields["VmRSS"], 3), "peak_gb": round(fields["VmHWM"], 3)}


def session(
    url: str, seed: int, steps: int, scrubs: int, deadline: float, results: dict, lock: threading.Lock
) -> None:
    from gradio_client import Client

    latencies = {"generate": [], "scrub": []}
    errors: list[str] = []
    try:
        client = Client(url, verbose=False)
        started = time.perf_counter()
        client.predict(seed, steps, 8, None, api_name="/generate")
        latencies["generate"].append(time.perf_counter() - started)
        own_start = client.predict(0, api_name="/scrub")[1]["url"]  # x_t at step 0: this session's noise
        rng = random.Random(seed)
        for _ in range(scrubs):
            if time.time() > deadline:
                errors.append("deadline reached")
                break
            step = rng.randrange(steps)
            started = time.perf_counter()
            view = client.predict(step, api_name="/scrub")
            latencies["scrub"].append(time.perf_counter() - started)
            info = view[SCRUB_STEP_INFO]
            shown = STEP_INFO.search(info if isinstance(info, str) else "")
            if shown is None or int(shown[1]) != step:
                errors.append(f"scrub to {step} showed {info!r}")
        # isolation: after every other session generated, this one still sees its own trajectory
        if client.predict(0, api_name="/scrub")[1]["url"] != own_start:
            errors.append(f"session {seed} sees another trajectory")
        with lock:
            results["starts"].append(own_start)
    except Exception as error:  # the bench counts every failure instead of stopping
        errors.append(f"{type(error).__name__}: {error}")
    with lock:
        for kind, values in latencies.items():
            results[kind].extend(values)
        results["errors"].extend(errors)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--scrubs", type=int, default=20, help="slider updates per session")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps per generation")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before every session stops")
    parser.add_argument("--model", default=None)
    parser.add_argument("--index", default=None)
    parser.add_argument("--json", default=None, help="record the figures in this result file (case: --case)")
    parser.add_argument("--case", default=None, help="the case name (default: SESSIONSxSTEPS)")
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--host", "127.0.0.1"]
    if args.model:
        command += ["--model", args.model]
    if args.index:
        command += ["--index", args.index]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        print(f"app served after {wait_for_page(url, process, 120):.1f} s")
        before = server_memory_gb(process.pid)
        results: dict = {"generate": [], "scrub": [], "errors": [], "starts": []}
        lock = threading.Lock()
        deadline = time.time() + args.timeout
        threads = [
            threading.Thread(
                target=session, args=(url, 100 + i, args.steps, args.scrubs, deadline, results, lock)
            )
            for i in range(args.sessions)
        ]
        started = time.time()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.time() + 30))
        wall = time.time() - started
        after = server_memory_gb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(
        f"{args.sessions} concurrent sessions, {args.scrubs} scrubs each, {args.steps}-step "
        f"generations, wall {wall:.1f} s"
    )
    for kind in ("generate", "scrub"):
        values = results[kind]
        if not values:
            print(f"{kind:>8}: n=0")
            continue
        print(
            f"{kind:>8}: n={len(values)}  p50={percentile(values, 50) * 1000:.0f} ms  "
            f"p95={percentile(values, 95) * 1000:.0f} ms"
            "  (client round trip on 127.0.0.1, queueing included)"
        )
    if len(set(results["starts"])) != len(results["starts"]):
        results["errors"].append("two sessions showed the same trajectory")
    per_session = (after["rss_gb"] - before["rss_gb"]) / args.sessions
    print(
        f"server memory: {before['rss_gb']:.2f} GB before, {after['rss_gb']:.2f} GB after, peak "
        f"{after['peak_gb']:.2f} GB: {per_session * 1024:.0f} MB per session"
    )
    print(f"errors: {len(results['errors'])}")
    for error in results["errors"][:10]:
        print(f"  {error}")
    if args.json:
        from results_file import write_case

        latency = {
            kind: {
                "n": len(v),
                "p50_ms": round(percentile(v, 50) * 1000),
                "p95_ms": round(percentile(v, 95) * 1000),
            }
            for kind, v in results.items()
            if kind in ("generate", "scrub") and v
        }
        write_case(
            args.json,
            args.case or f"{args.sessions}x{args.steps}",
            {
                "sessions": args.sessions,
                "steps": args.steps,
                "scrubs": args.scrubs,
                "wall_s": round(wall, 1),
                "latency": latency,
                "memory_before": before,
                "memory_after": after,
                "mb_per_session": round(per_session * 1024),
                "errors": len(results["errors"]),
                "command": f"python -m bench.load --sessions {args.sessions} --scrubs {args.scrubs} "
                f"--steps {args.steps}",
            },
        )
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
