"""Serve the Diffusion Attribution Explorer: `python app.py` opens the shipped default (assets/)."""

import argparse
import logging
import os
import sys

# Offline by design: set before gradio is imported (no analytics, no Hub calls, no proxy for localhost).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

from explorer.device import DEVICES  # noqa: E402 (a name list: torch loads later)
from explorer.model_args import MODEL_HELP, add_lora_arguments  # noqa: E402 (light: no torch)

DEFAULT_MODEL, DEFAULT_INDEX = "assets/model", "assets/index"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP + " (default: %(default)s)")
    add_lora_arguments(parser)
    parser.add_argument(
        "--index",
        action="append",
        metavar="DIR",
        help=f"attribution index directory; repeat to offer several methods (default: {DEFAULT_INDEX})",
    )
    parser.add_argument(
        "--classifier",
        default=None,
        help="feature classifier directory (default: MODEL/classifier when it exists; without one the "
        "likelihood curves are off and the page says why)",
    )
    parser.add_argument(
        "--clip",
        default=None,
        metavar="DIR",
        help="a CLIP model folder (transformers CLIPModel, safetensors) or its Hub id in the local cache: "
        "zero-shot likelihood curves of --concepts instead of the class classifier",
    )
    parser.add_argument(
        "--concepts",
        default=None,
        help="with --clip: the concepts to score, comma-separated ('a cat, a dog')",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="auto, cpu, cuda or mps: where sampling and query gradients run (default: cpu)",
    )
    parser.add_argument(
        "--host", default=None, help="address to bind (default: 127.0.0.1; 0.0.0.0 on a Hugging Face Space)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
        help="port (default: $GRADIO_SERVER_PORT or 7860)",
    )
    args = parser.parse_args(argv)
    args.index = args.index or [DEFAULT_INDEX]
    if args.host is None:
        args.host = "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("explorer").setLevel(logging.INFO)  # ours only: not faiss's loader or gradio's httpx
    from explorer.attribution import Explorer  # heavy imports (torch, faiss, gradio) only now
    from explorer.device import resolve_device
    from explorer.errors import ExplorerError

    try:
        explorer = Explorer.from_dirs(
            args.model,
            args.index,
            args.classifier,
            args.clip,
            args.concepts,
            resolve_device(args.device),
            lora=args.lora,
            lora_scale=1.0 if args.lora_scale is None else args.lora_scale,
        )
    except ExplorerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from explorer.web import ui

    ui.launch(ui.build(explorer), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
