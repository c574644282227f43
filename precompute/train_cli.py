"""The `train` command of the precompute CLI."""

from __future__ import annotations

from precompute.cli_types import non_negative_int, positive_float, positive_int


def add_train(commands) -> None:
    from precompute.train import TrainConfig

    defaults = TrainConfig()
    parser = commands.add_parser("train", help="train the DDPM (EMA) and the feature classifier")
    parser.add_argument(
        "--data", required=True, help="mnist5k, digits, or a folder of images in class subfolders"
    )
    parser.add_argument("--out", required=True, help="model directory to write (DDPM pipeline layout)")
    parser.add_argument(
        "--size", type=positive_int, default=None, help="image side (default: 16 for mnist5k, 8 for digits)"
    )
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), default=1, help="1: grayscale, 3: RGB (folders of images)"
    )
    parser.add_argument("--steps", type=positive_int, default=defaults.steps)
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    parser.add_argument("--lr", type=positive_float, default=defaults.learning_rate)
    parser.add_argument("--seed", type=non_negative_int, default=defaults.seed)
    parser.add_argument("--checkpoint-every", type=positive_int, default=defaults.checkpoint_every)
    parser.add_argument("--classifier-epochs", type=positive_int, default=defaults.classifier_epochs)
    parser.add_argument(
        "--tiny", action="store_true", help="a ~160k-parameter UNet (for tests and quick trials)"
    )
    parser.add_argument(
        "--classifier-only",
        action="store_true",
        help="(re)train only the feature classifier into OUT/classifier",
    )
    parser.set_defaults(run=run_train)


def run_train(args) -> None:
    import dataclasses

    from explorer.data import load_dataset, train_heldout_split
    from explorer.model import UNetConfig, tiny_config
    from precompute.train import TrainConfig, train_classifier, train_ddpm

    size = args.size if args.size is not None else (8 if args.data == "digits" else 16)
    train, heldout = train_heldout_split(load_dataset(args.data, size, args.channels))
    unet_config = tiny_config(size) if args.tiny else UNetConfig(sample_size=size)
    unet_config = dataclasses.replace(unet_config, channels=args.channels)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        classifier_epochs=args.classifier_epochs,
    )
    if not args.classifier_only:
        train_ddpm(train, args.out, config, unet_config)
    accuracy = train_classifier(train, heldout, f"{args.out}/classifier", config)
    print(f"model written to {args.out}; classifier held-out accuracy {accuracy:.4f} ({len(heldout)} images)")
