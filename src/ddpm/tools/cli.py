"""The `ddpm` command: tools outside the pipeline.

    ddpm summary [--params params.yaml]       parameter count and GFLOP per image
    ddpm sample --model models/model.pt -n N --out DIR   sample outside the pipeline
    ddpm fid A B                              FID/KID between two image sets
    ddpm bench [--quick|--full] [--set KEY=VALUE]   throughput and MFU on this machine
    ddpm demo [--out demo-run]                the whole pipeline on synthetic data
    ddpm tracking replay [FILE ...]           send spooled MLflow calls to the store
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any

from ..config import ConfigError, Sampler, load_params
from ..stageutil import OneLineParser


def at_least(minimum: int, args: argparse.Namespace, *names: str) -> None:
    """A usage error, in one line, for an option below `minimum`."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {minimum}, "
                              f"got {value}")


def cmd_summary(args: argparse.Namespace) -> None:
    from ..model.unet import UNet, count_parameters, forward_flops

    params = load_params(args.params)
    model = UNet(params.model)
    size = params.preprocess.image_size
    gflop = forward_flops(model, size) / 1e9
    print(f"U-Net {list(params.model.channels)}, attention {list(params.model.attention)}, "
          f"{params.model.blocks_per_level} blocks per level")
    print(f"parameters: {count_parameters(model):,}")
    print(f"forward: {gflop:.2f} GFLOP per {size}x{size} image "
          f"(training ~{3 * gflop:.1f} GFLOP per image)")


# generate.<key> as `ddpm sample` spells it, for its messages.
SAMPLE_OPTIONS = {"num_samples": "-n", "batch_size": "--batch-size", "steps": "--steps",
                  "eta": "--eta", "variance": "--variance", "sampler": "--sampler"}


def cmd_sample(args: argparse.Namespace) -> None:
    import time

    from tqdm import tqdm

    from ..evaluate.model_file import load, load_model
    from ..model.diffusion import make_schedule
    from ..train.fastpath import denoiser
    from ..evaluate.generate import generate_samples, request_config
    from ..evaluate.figures import save_png
    from ..device import resolve_device

    def settings(diffusion_steps: int | None) -> Any:
        return request_config(diffusion_steps, num_samples=args.n, sampler=args.sampler,
                              steps=args.steps, eta=args.eta, batch_size=args.batch_size,
                              seed=args.seed, weights=args.weights, clip=not args.no_clip,
                              variance=args.variance, names=SAMPLE_OPTIONS)

    settings(None)  # before the model loads
    device = resolve_device(args.device)
    model, diffusion_cfg, size = load_model(load(args.model), args.weights, device, args.model)
    cfg = settings(diffusion_cfg.steps)
    steps = cfg.steps
    started = time.perf_counter()
    with tqdm(total=args.n, desc="sampling", unit="img") as bar:
        samples = generate_samples(denoiser(model, device, diffusion=diffusion_cfg),
                                   make_schedule(diffusion_cfg).to(device), cfg, size, device,
                                   progress=bar.update)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(samples):
        save_png(image.transpose(1, 2, 0), out / f"{i:06d}.png")
    print(f"{len(samples)} samples ({args.sampler}, {steps} steps) in {out} "
          f"({len(samples) / seconds:.2f} img/s on {device})")


def cmd_fid(args: argparse.Namespace) -> None:
    from ..evaluate import fid

    at_least(1, args, "batch_size", "kid_subsets")
    at_least(2, args, "kid_subset_size")
    result = fid.compare(args.a, args.b, device=args.device, kid=not args.no_kid,
                         batch_size=args.batch_size, kid_subsets=args.kid_subsets,
                         kid_subset_size=args.kid_subset_size)
    if args.json:
        print(json.dumps(result))
        return
    line = f"FID {result['fid']:.6g} ({result['count_a']} vs {result['count_b']} images)"
    if result["kid"] is not None:
        line += f", KID {result['kid']:.6g} ± {result['kid_std']:.3g}"
    print(line)


def cmd_replay(args: argparse.Namespace) -> None:
    """Send spool files (default: all under <repo root>/.mlflow-spool/) to the store."""
    from .. import tracking

    files = [Path(f) for f in args.files] or tracking.spool_files()
    if not files:
        print("nothing to replay")
    failed = 0
    for file in files:
        try:
            print(f"{file}: replayed into run {tracking.replay_spool(file, args.tracking_uri)}")
        except Exception as err:  # noqa: BLE001 - report each file, go on with the next
            print(f"error: {file}: {type(err).__name__}: {err}", file=sys.stderr)
            failed += 1
    if failed:
        sys.exit(1)


def cmd_bench(args: argparse.Namespace) -> None:
    from ..config import parse_overrides
    from ..device import resolve_device
    from .bench import run_bench

    params = load_params(args.params, parse_overrides(args.set))
    device = resolve_device(args.device or params.train.device)
    run_bench(params, device, quick=args.quick, out_path=Path(args.out) if args.out else None)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, params_path=args.params)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ddpm", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("summary", help="model parameter count and forward GFLOP")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("sample", help="sample images from a saved model into a folder of PNGs")
    p.add_argument("--model", default="models/model.pt")
    p.add_argument("-n", type=int, default=64, help="number of samples")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--sampler", choices=typing.get_args(Sampler), default="ddim")
    p.add_argument("--steps", type=int, default=None,
                   help="model evaluations (default: all T; ddpm always takes T)")
    p.add_argument("--eta", type=float, default=None,
                   help="ddim: its noise (default 0); dpmpp_2m_sde: > 0 (default 1, the "
                        "reverse SDE); dpmpp_2m: 0")
    p.add_argument("--no-clip", action="store_true",
                   help="do not clamp the predicted x0 to [-1, 1] (generate.clip: false)")
    p.add_argument("--variance", choices=["posterior", "beta"], default="posterior",
                   help="ddpm's sigma_t^2 (generate.variance)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("fid", help="FID and KID between two image sets")
    p.add_argument("a", help="a folder of images (any size or mode, searched recursively), a "
                             ".npy/.npz/.pt file of uint8 images, or a statistics .npz")
    p.add_argument("b")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--no-kid", action="store_true")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("tracking", help="MLflow helpers: `ddpm tracking replay [FILE ...]`")
    tracking = p.add_subparsers(dest="tracking_command", required=True,
                                parser_class=OneLineParser)
    p = tracking.add_parser("replay", help="send calls spooled while the tracking server was "
                                           "down to the store")
    p.add_argument("files", nargs="*", help="spool files (default: all in "
                                            "<repo root>/.mlflow-spool/)")
    p.add_argument("--tracking-uri", help="store to send them to (default: the spooled one)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("bench", help="training, sampling and FID throughput on this machine")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: train.device)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--quick", dest="quick", action="store_true", default=None,
                        help="few iterations (the default on a CPU)")
    length.add_argument("--full", dest="quick", action="store_false",
                        help="more iterations (the default on CUDA)")
    p.add_argument("--out", default="reports/bench.json",
                   help="the figures as JSON, the printout beside it as .txt ('' = neither)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param for this run, e.g. --set train.precision=bf16")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="run the whole pipeline on synthetic data in a scratch folder")
    p.add_argument("--out", default="demo-run", help="scratch folder (default: demo-run)")
    p.add_argument("--params", default="params.yaml", help="base params (never modified)")
    p.set_defaults(func=cmd_demo)
    return parser


# Errors whose message says what is wrong and how to fix it: shown as one line, no
# traceback. Named, not imported, so that `ddpm --help` loads neither torch nor mlflow.
USER_ERRORS = ("ddpm.config.ConfigError", "ddpm.evaluate.fid.features.FidInputError",
               "ddpm.evaluate.fid.features.FidWeightsError",
               "ddpm.evaluate.model_file.CheckpointError",
               "ddpm.train.checkpoint.CheckpointWriteError",
               "ddpm.tracking.TrackingError")


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, NotADirectoryError, PermissionError)):
        return True
    for name in USER_ERRORS:
        module, _, cls = name.rpartition(".")
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(err, getattr(loaded, cls)):
            return True
    return False


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as err:  # noqa: BLE001 - a user's mistake is one line; a bug a traceback
        if not _is_user_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
