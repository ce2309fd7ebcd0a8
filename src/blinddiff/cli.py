"""The `blinddiff` command line: one sub-command per job, each a thin layer over the Python API.

Errors in the arguments or inputs end with one line naming the culprit and exit status 2; problems with
single inputs among many are reported by name, the rest is still processed, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TextIO

from . import __version__

if TYPE_CHECKING:
    from .inference import SampleOptions


def report(problems: list[str]) -> int:
    """Print per-input problems to stderr; exit status 1 if there were any."""
    for problem in problems:
        print(f"blinddiff: error: {problem}", file=sys.stderr)
    if problems:
        print(f"blinddiff: {len(problems)} input(s) failed (see above); the others were processed", file=sys.stderr)
    return 1 if problems else 0


def cmd_make_benchmark(args: argparse.Namespace) -> int:
    from .testsets import build_testset

    records, problems = build_testset(args.hr, args.out, args.protocol, args.scale, downsample=args.downsample,
                                      noise=args.noise, seed=args.seed, kernel_size=args.kernel_size,
                                      force=args.force)
    print(f"wrote {len(records)} case(s) to {args.out} (manifest: {args.out}/manifest.json)")
    return report(problems)


def cmd_degrade(args: argparse.Namespace) -> int:
    from .testsets import degrade_files

    problems = degrade_files(args.inputs, args.out, args.scale, args.kernel, downsample=args.downsample,
                             noise=args.noise, seed=args.seed, kernel_size=args.kernel_size)
    return report(problems)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import prepare_run, train

    if args.max_minutes is not None and not args.max_minutes > 0:
        raise ValueError(f"--max-minutes {args.max_minutes}: must be a positive number of minutes")
    cfg = prepare_run(Path(args.out), args.config, args.set, args.resume)
    result = train(cfg, args.out, resume=args.resume, progress=not args.no_progress,
                   max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    return 0 if result.finished else TIME_BOX_EXIT


TIME_BOX_EXIT = 75  # EX_TEMPFAIL: the time box ended the call, run it again (with --resume) to continue


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import export_weights

    if Path(args.out).resolve() == Path(args.weights).resolve():
        raise ValueError(f"--out {args.out} is the input; choose another file name")
    size = export_weights(args.weights, args.out, args.dtype)
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB, {args.dtype})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .config import config_to_dict, load_config
    from .model import describe_complexity

    if args.size is not None and not 8 <= args.size <= 16384:
        raise ValueError(f"--size {args.size} is invalid; give the HR side in pixels, 8 to 16384 (default: data.crop)")
    cfg = load_config(args.config, args.set)
    size = args.size or cfg.data.crop
    info = {"config": cfg.name, "hr_size": size, "scale": cfg.data.scale, **describe_complexity(cfg.model, size,
                                                                                                 cfg.data.scale)}
    if args.json:
        print(json.dumps({**info, "resolved_config": config_to_dict(cfg)}, indent=2))
        return 0
    print(f"{cfg.name}: {info['parameters']:,} parameters ({info['parameters'] / 1e6:.2f} M)")
    for part, count in info["parameters_per_part"].items():
        print(f"  {part:<18} {count:>12,}")
    print(f"one forward at {size}x{size} HR (LR {info['lr_size']}x{info['lr_size']}, batch 1): "
          f"{info['gflops']:.2f} GFLOP")
    return 0


def sample_options_from(args: argparse.Namespace) -> SampleOptions:
    """The options of --mode, with every sampling flag given on the command line taking precedence."""
    from .inference import SampleOptions

    given = {name: getattr(args, name) for name in ("steps", "sampler", "eta", "zeta", "guidance", "gradient",
                                                     "x0_norm_weight", "tile", "tile_overlap")}
    return SampleOptions.for_mode(args.mode, **{k: v for k, v in given.items() if v is not None})


def cmd_upscale(args: argparse.Namespace) -> int:
    from .inference import BlindDiff, upscale_files

    model = BlindDiff.from_pretrained(args.weights, device=args.device, precision=args.precision,
                                      config=args.config, allow_pickle=args.allow_pt)
    if args.command == "deblur":
        model.check_deblurring()
    problems = upscale_files(model, args.inputs, args.out, sample_options_from(args), seed=args.seed,
                             batch_size=args.batch_size, suffix=args.suffix, ext=args.ext,
                             save_trajectory=args.save_trajectory, progress=not args.no_progress)
    return report(problems)


def add_sampling_options(parser: argparse.ArgumentParser, weights_required: bool = False) -> None:
    """Weights, device and reverse-process options shared by `upscale`, `deblur` and `benchmark`."""
    from .inference import DEFAULT_WEIGHTS, MODES, SampleOptions

    perceptual, fidelity = SampleOptions.for_mode("perceptual"), SampleOptions.for_mode("fidelity")
    if weights_required:
        parser.add_argument("--weights", required=True, help="a .safetensors file or a shipped model name")
    else:
        parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="a .safetensors file or a shipped model name")
    parser.add_argument("--config", default=None, help="config for weights without one (.pt files)")
    parser.add_argument("--allow-pt", action="store_true", help="read .pt/.pth weights (with weights_only=True)")
    parser.add_argument("--mode", choices=tuple(MODES), default="perceptual",
                        help=f"perceptual: guided reverse process ({perceptual.steps} steps, ζ {perceptual.zeta:g}); "
                             f"fidelity: x̂0 in {fidelity.steps} step(s), highest PSNR. The flags below override it")
    parser.add_argument("--steps", type=int, help="reverse-process steps")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"))
    parser.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--zeta", type=float, help="step size ζ of the kernel-aware gradient (paper: 1 with --gradient xt)")
    parser.add_argument("--guidance", choices=("kernel-aware", "bicubic", "none"),
                        help="data term between steps (paper: kernel-aware)")
    parser.add_argument("--gradient", choices=("xt", "x0"),
                        help="back-propagate the data term through the network to x_t (paper) or take it at x̂0 "
                             "(the default: no backward pass through the network)")
    parser.add_argument("--x0-norm-weight", type=float, help="weight of the release's extra ‖x̂0‖ term (release: 0.1)")
    parser.add_argument("--tile", type=int, default=None, help="HR tile size for large images (e.g. 256)")
    parser.add_argument("--tile-overlap", type=int, help=f"tile overlap in HR pixels (default {perceptual.tile_overlap})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every image")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=1, help="images of the same size processed together")


def add_upscale_command(commands: argparse._SubParsersAction, name: str, help: str, description: str) -> None:
    parser = commands.add_parser(name, help=help, description=description)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--out", required=True, help="output folder")
    add_sampling_options(parser)
    parser.add_argument("--suffix", default="", help="appended to output stems, e.g. _x4")
    parser.add_argument("--ext", choices=("png", "jpg", "auto"), default="auto", help="auto keeps JPEG as JPEG")
    parser.add_argument("--save-trajectory", action="store_true", help="save x̂0 and k̂ of every step")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=cmd_upscale)


def add_degradation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", type=int, default=4, help="downscaling factor s ≥ 1 (1 = blur only)")
    parser.add_argument("--downsample", choices=("bicubic", "direct"), default="bicubic",
                        help="MATLAB bicubic resize (the benchmarks) or every s-th pixel (paper Eq. 1)")
    parser.add_argument("--noise", type=float, default=0.0, help="Gaussian noise sigma on the [0, 1] scale")
    parser.add_argument("--seed", type=int, default=0, help="seed for random kernels and noise")
    parser.add_argument("--kernel-size", type=int, default=None,
                        help="kernel size (default 21; 64 for motion blur)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blinddiff", description="Blind super-resolution with diffusion (BlindDiff).")
    parser.add_argument("--version", action="version", version=f"blinddiff {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser("make-benchmark", help="build a synthetic test set (HR, LR, kernels, manifest)",
                                description="Build a synthetic test set from a folder of HR images (SPEC §2).")
    bench.add_argument("--hr", required=True, help="folder of HR images")
    bench.add_argument("--protocol", default="gaussian8", help="gaussian8 | aniso | motion | iso:SIGMA")
    bench.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    bench.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    add_degradation_options(bench)
    bench.set_defaults(run=cmd_make_benchmark)

    deg = commands.add_parser("degrade", help="blur, downsample and quantise single images",
                              description="Degrade images with a given or random kernel; writes LR and kernel.")
    deg.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    deg.add_argument("--out", required=True, help="output folder")
    deg.add_argument("--kernel", required=True,
                     help="iso:SIGMA, aniso:SX,SY,THETA, motion:INTENSITY, random-iso, random-aniso, "
                          "random-motion, or a kernel file (.npy, .png, .mat)")
    add_degradation_options(deg)
    deg.set_defaults(run=cmd_degrade)

    tr = commands.add_parser("train", help="train MCFormer (single process or under torchrun)",
                             description="Train MCFormer; the same command runs under torchrun for DDP.")
    tr.add_argument("--config", help="preset name (e.g. small-x4, paper-iso-x4) or YAML file")
    tr.add_argument("--out", required=True, help="run folder (config, log.jsonl, checkpoints/, weights)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    tr.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--max-minutes", type=float, metavar="M",
                    help=f"time box: checkpoint and stop after M minutes (exit {TIME_BOX_EXIT}); rerun with --resume "
                         "to continue, e.g. in ≤ 9-minute GPU chunks")
    tr.set_defaults(run=cmd_train)

    export = commands.add_parser("export", help="EMA weights of a run or checkpoint as one file",
                                 description="Write the EMA weights of a weights file or a checkpoint's "
                                             ".index.json as one .safetensors file with its config.")
    export.add_argument("weights", help="weights.safetensors or checkpoints/step_XXXXXXXX.index.json")
    export.add_argument("--out", required=True, help="the .safetensors file to write")
    export.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="precision of the stored tensors (fp16: half the size, for shipping)")
    export.set_defaults(run=cmd_export)

    add_upscale_command(commands, "upscale", "blind super-resolution of images (MAP reverse process)",
                        "Blind SR: estimates the kernel and the HR image together (SPEC §5).")
    add_upscale_command(commands, "deblur", "blind deblurring with a scale-1 model",
                        "Blind deblurring: `upscale` with a scale-1 (paper-deblur) model.")

    info = commands.add_parser("info", help="parameters and GFLOPs of a config's network",
                               description="Parameter counts (total and per part) and GFLOPs of one forward.")
    info.add_argument("--config", required=True, help="preset name or YAML file")
    info.add_argument("--size", type=int, default=None, help="HR size H of the H×H forward (default: data.crop)")
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=cmd_info)

    from .evaluation import add_evaluation_commands

    add_evaluation_commands(commands)
    return parser


class PipeSafeStdout:
    """stdout that survives a reader going away (`blinddiff … | head -1`): once the pipe is closed, further
    output is dropped and the work goes on, so no input is left unprocessed because nobody reads the log."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def _closed(self) -> None:
        with contextlib.suppress(Exception):  # also stop the interpreter's final flush from failing
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        self.stream = open(os.devnull, "w")

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._closed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 1 some input or the run failed, 2 bad arguments or setup."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    stdout, sys.stdout = sys.stdout, PipeSafeStdout(sys.stdout)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"blinddiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (OSError, FloatingPointError) as err:  # disk full, no permission, a diverged training run …
        print(f"blinddiff {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("blinddiff: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
