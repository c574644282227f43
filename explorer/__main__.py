"""explorer CLI for scripts: `python -m explorer attribute --index DIR --image FILE.png --timestep T`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from explorer.errors import ExplorerError
from explorer.model_args import add_model_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m explorer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    attribute = commands.add_parser(
        "attribute", help="top positive and negative training influencers of an image"
    )
    attribute.add_argument(
        "--index", required=True, help="index directory written by `python -m precompute featurize`"
    )
    add_model_arguments(attribute, None, required=False)  # default: the model and adapter the index records
    attribute.add_argument(
        "--image", required=True, help="query image file (any size or mode; resized to the model's)"
    )
    attribute.add_argument(
        "--timestep", type=int, required=True, help="train timestep 0..T-1 to attribute at"
    )
    attribute.add_argument("--top-k", type=int, default=10)
    attribute.add_argument("--prompt", default=None, help="a text-to-image model's caption for the image")
    attribute.add_argument(
        "--region",
        default=None,
        help="X0,Y0,X1,Y1: attribute only the output inside this box (model pixels, X1 and Y1 exclusive)",
    )
    attribute.add_argument("--json", action="store_true", help="print JSON")
    return parser


def run_attribute(args) -> dict:
    from explorer.attribution import Explorer
    from explorer.classifier import load_classifier
    from explorer.data import load_image_file
    from explorer.index import AttributionIndex, read_meta
    from explorer.model import load_model

    model_dir, lora, scale = args.model, args.lora, args.lora_scale
    if model_dir is None:  # the model the index was built for, with its adapter unless --lora says otherwise
        meta = read_meta(Path(args.index))
        model_dir = meta.model_path
        if lora is None and meta.lora is not None:
            lora = meta.lora.path
            scale = meta.lora.scale if scale is None else scale
    model = load_model(model_dir, lora=lora, lora_scale=1.0 if scale is None else scale)
    index = AttributionIndex.load(args.index, model=model)
    classifier_dir = Path(model_dir) / "classifier"
    classifier = load_classifier(classifier_dir) if classifier_dir.exists() else None
    explorer = Explorer(model, {args.index: index}, classifier)
    image = load_image_file(args.image, model.image_size, model.image_channels)
    region = None if args.region is None else args.region.split(",")
    result = explorer.attribute_image(image, args.timestep, args.index, args.top_k, region, args.prompt)

    def rows(search, negative: bool = False) -> list[dict]:
        return [
            {
                "id": int(i),
                "label": index.class_names[int(index.train_labels[p])],
                **({"caption": index.train_captions[p]} if index.train_captions else {}),
                "score": float(s),
                **({"kind": "negative" if s < 0 else "least aligned"} if negative else {}),
            }
            for i, p, s in zip(search.ids, search.positions, search.scores)
        ]

    return {
        "timestep": result.timestep,
        "region": None if region is None else [int(v) for v in region],
        "bucket": result.bucket,
        "score": index.score_name,
        "negative_count": result.negative_count,
        "positive": rows(result.positive),
        "negative": rows(result.negative, negative=True),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_attribute(args)
    except ExplorerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"timestep {result['timestep']} (bucket {result['bucket']})")
        for side in ("positive", "negative"):
            print(f"{side}:")
            for row in result[side]:
                kind = f"  ({row['kind']})" if row.get("kind") == "least aligned" else ""
                name = f"{row['caption']!r}" if "caption" in row else f"label {row['label']:>3}"
                print(f"  id {row['id']:>6}  {name}  score {row['score']:+.4f}{kind}")
        print(f"{result['negative_count']} training images have a negative score ({result['score']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
