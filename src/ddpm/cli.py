"""The `ddpm` command: tools outside the pipeline.

    ddpm summary [--params params.yaml]       parameter count and GFLOP per image
    ddpm demo [--out demo-run]                the whole pipeline on synthetic data
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_params


def cmd_summary(args: argparse.Namespace) -> None:
    from .unet import UNet, count_parameters, forward_flops

    params = load_params(args.params)
    model = UNet(params.model)
    size = params.preprocess.image_size
    gflop = forward_flops(model, size) / 1e9
    print(f"U-Net {list(params.model.channels)}, attention {list(params.model.attention)}, "
          f"{params.model.blocks_per_level} blocks per level")
    print(f"parameters: {count_parameters(model):,}")
    print(f"forward: {gflop:.2f} GFLOP per {size}x{size} image "
          f"(training ~{3 * gflop:.1f} GFLOP per image)")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, params_path=args.params)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="model parameter count and forward GFLOP")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("demo", help="run the whole pipeline on synthetic data in a scratch folder")
    p.add_argument("--out", default="demo-run", help="scratch folder (default: demo-run)")
    p.add_argument("--params", default="params.yaml", help="base params (never modified)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
