"""The `blinddiff` command line: one sub-command per job, each a thin layer over the Python API.

Errors in the arguments or inputs end with one line naming the culprit and exit status 2; problems with
single inputs among many are reported by name, the rest is still processed, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from . import __version__

if TYPE_CHECKING:
    from .inference import SampleOptions
    from .metrics import MetricSuite

__all__ = ["TIME_BOX_EXIT", "build_parser", "main", "sample_options_from"]


def with_flags(message: str, args: argparse.Namespace) -> str:
    """Library errors name parameters (`tile=4: …`); on the command line the flag is named (`--tile 4: …`),
    and a switch given as `name=True` is the bare flag (`allow_pickle=True` → `--allow-pickle`)."""
    def flag(match: re.Match) -> str:
        name, value = match[1], match[2]
        if name not in vars(args):
            return match[0]
        switch = value == "True" and isinstance(vars(args)[name], bool)
        return f"--{name.replace('_', '-')}" + ("" if switch else f" {value or ''}")

    return re.sub(r"(?<![\w-])([a-z][a-z0-9_]*)=(True\b)?", flag, message)


def report(problems: list[str], args: argparse.Namespace, processed: int | None = None) -> int:
    """Print per-input problems to stderr, then (for more than one input) how many failed of how many, when
    `processed` (the inputs done) is known; exit status 1 if there were any problems."""
    for problem in problems:
        print(f"blinddiff: error: {with_flags(problem, args)}", file=sys.stderr)
    failed = len(problems)
    if failed and processed:
        print(f"blinddiff: {failed} of {failed + processed} inputs failed (see above); the other"
              f"{f's ({processed}) were' if processed > 1 else ' was'} processed", file=sys.stderr)
    elif failed > 1:
        print(f"blinddiff: {'all ' if processed == 0 else ''}{failed} inputs failed (see above)", file=sys.stderr)
    return 1 if problems else 0


def cmd_make_benchmark(args: argparse.Namespace) -> int:
    from .testsets import build_pair_set, build_testset

    if args.lr is not None:
        given = [flag for flag, value in (("--protocol", args.protocol != "gaussian8"), ("--crop", args.crop),
                                          ("--limit", args.limit), ("--noise", args.noise)) if value]
        if given:
            raise ValueError(f"{', '.join(given)}: real pairs (--lr) are used as they are; leave "
                             f"{'it' if len(given) == 1 else 'them'} out")
        records, problems = build_pair_set(args.hr, args.lr, args.out, force=args.force)
        print(f"wrote {len(records)} real pair(s) to {args.out} (manifest: {args.out}/manifest.json)")
        return report(problems, args, processed=len(records))
    records, problems = build_testset(args.hr, args.out, args.protocol, args.scale, downsample=args.downsample,
                                      noise=args.noise, seed=args.seed, kernel_size=args.kernel_size,
                                      crop=args.crop, limit=args.limit, force=args.force)
    print(f"wrote {len(records)} case(s) to {args.out} (manifest: {args.out}/manifest.json)")
    return report(problems, args, processed=len({record["hr"] for record in records}))


def cmd_degrade(args: argparse.Namespace) -> int:
    from .testsets import degrade_files

    if (args.pipeline == "real") == (args.kernel is not None):
        raise ValueError("give --kernel (the paper's model: blur, downsample, noise) or --pipeline real (the "
                         "real-world chain draws its own kernels), not both and not neither")
    problems = degrade_files(args.inputs, args.out, args.scale, args.kernel, downsample=args.downsample,
                             noise=args.noise, seed=args.seed, kernel_size=args.kernel_size, pipeline=args.pipeline,
                             real_config=args.config)
    return report(problems, args)


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
    from .checkpoint import export_weights, resolve_weights

    if args.format == "onnx" and args.dtype is not None:
        raise ValueError(f"--dtype {args.dtype} applies to --format safetensors; the ONNX graph is float32")
    if args.format == "safetensors" and args.noise is not None:
        raise ValueError(f"--noise {args.noise} applies to --format onnx; leave it out for safetensors")
    if Path(args.out).resolve() == resolve_weights(args.weights).resolve():
        raise ValueError(f"--out {args.out} is the input; choose another file name")
    if args.format == "onnx":
        from .onnx_export import export_onnx

        noise = args.noise or "graph"
        print(f"exporting the fidelity mode of {args.weights} to ONNX (a minute or more on a CPU) …", file=sys.stderr)
        size = export_onnx(args.weights, args.out, noise=noise)
        print(f"wrote {args.out} ({size / 2**20:.1f} MiB, ONNX, fidelity mode, noise drawn "
              f"{'in the graph' if noise == 'graph' else 'by the caller (input noise)'})")
        return 0
    dtype = args.dtype or "fp32"
    size = export_weights(args.weights, args.out, dtype)
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB, {dtype})")
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
    """The options of --mode as tuned for --weights (a shipped model's registry entry), with every sampling
    flag given on the command line taking precedence."""
    from dataclasses import fields

    from .checkpoint import sampling_defaults
    from .inference import SampleOptions

    given = {f.name: getattr(args, f.name) for f in fields(SampleOptions)}
    return SampleOptions.for_mode(args.mode, sampling_defaults(args.weights),
                                  **{k: v for k, v in given.items() if v is not None})


def cmd_models(args: argparse.Namespace) -> int:
    from .checkpoint import load_weights, resolve_weights, shipped_weights
    from .inference import DEFAULT_DEBLUR_WEIGHTS, DEFAULT_WEIGHTS, MODES, SampleOptions

    defaults = {DEFAULT_WEIGHTS: "upscale", DEFAULT_DEBLUR_WEIGHTS: "deblur"}
    rows = []
    for name, entry in shipped_weights().items():
        path = resolve_weights(name)  # checks the recorded sha256
        tensors, cfg, _ = load_weights(path)
        network = {k: v for k, v in tensors.items() if k.startswith("ema.")} or tensors
        modes = {mode: SampleOptions.for_mode(mode, entry.get("sampling")) for mode in MODES}
        rows.append({"name": name, "default_for": defaults.get(name), "setting": cfg.data.setting,
                     "scale": cfg.data.scale, "parameters": sum(v.numel() for v in network.values()),
                     "file_bytes": path.stat().st_size, "sha256": entry["sha256"], "file": str(path),
                     "sampling": {mode: {"steps": o.steps, "sampler": o.sampler, "zeta": o.zeta,
                                         "guidance": o.guidance, "gradient": o.gradient}
                                  for mode, o in modes.items()}})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| model | default of | setting | scale | parameters | size | sha256 | perceptual | fidelity |")
    print("|---|---|---|---:|---:|---:|---|---|---|")
    for row in rows:
        sampling = [f"{o['sampler']} {o['steps']} step{'s' * (o['steps'] != 1)}, ζ {o['zeta']:g}"
                    + (f", {o['guidance']}" if o["zeta"] else "") for o in row["sampling"].values()]
        print(f"| {row['name']} | {row['default_for'] or ''} | {row['setting']} | ×{row['scale']} | "
              f"{row['parameters'] / 1e6:.2f} M | {row['file_bytes'] / 2**20:.1f} MiB | {row['sha256'][:12]} | "
              f"{' | '.join(sampling)} |")
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    from .batch import upscale_files
    from .inference import BlindDiff

    model = BlindDiff.from_pretrained(args.weights, device=args.device, precision=args.precision,
                                      config=args.config, allow_pickle=args.allow_pickle)
    if args.command == "deblur":
        model.check_deblurring()
    written: list[str] = []

    def log(line: str) -> None:  # one line per input done
        written.append(line)
        print(line)

    problems = upscale_files(model, args.inputs, args.out, sample_options_from(args), seed=args.seed,
                             batch_size=args.batch_size, suffix=args.suffix, ext=args.ext,
                             save_trajectory=args.save_trajectory, progress=not args.no_progress, log=log,
                             quality=args.quality, outscale=args.outscale)
    return report(problems, args, processed=len(written))


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(args.weights, host=args.host, port=args.port, device=args.device)
    return 0


def add_metric_options(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """The metric suite's options shared by `evaluate` and `benchmark`."""
    from .metrics import ALL_METRICS, LUMA

    parser.add_argument("--metrics", default=None,
                        help=f"comma-separated, from {','.join(ALL_METRICS)}; lpips = lpips_<--lpips-net> (default: "
                             "psnr,ssim,lpips_vgg,kernel_l1,lr_psnr, LPIPS when installed by `make metric-weights`, "
                             "plus niqe/fid when their files are given)")
    parser.add_argument("--luma", choices=LUMA, default="studio",
                        help="Y of PSNR/SSIM/LR-PSNR: studio-swing 16–235 (the paper's method rows, BasicSR) or "
                             "full-range 0.299R+0.587G+0.114B (the published Bicubic rows; 20·log10(255/219) = 1.32 dB "
                             "lower PSNR)")
    parser.add_argument("--lpips-backbone", default=None,
                        help="local torchvision VGG16 (or AlexNet) weights file, instead of the installed weights")
    parser.add_argument("--lpips-linear", default=None, help="local LPIPS v0.1 linear-layer file (vgg.pth / alex.pth)")
    parser.add_argument("--lpips-net", choices=("vgg", "alex"), default="vgg",
                        help="backbone of --metrics lpips and of the path options (paper: vgg)")
    parser.add_argument("--niqe-params", default=None, help="NIQE pristine parameters (.npz)")
    parser.add_argument("--fid-weights", default=None, help="pytorch-fid Inception weights (.pth); needs pytorch-fid")
    if device:
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def metric_suite_from(args: argparse.Namespace, device: Any) -> MetricSuite:
    from .metrics import build_metric_suite

    return build_metric_suite(args.metrics, lpips_backbone=args.lpips_backbone,
                              lpips_linear=args.lpips_linear, lpips_net=args.lpips_net, luma=args.luma,
                              niqe_params=args.niqe_params, fid_weights=args.fid_weights, device=device)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_results, group_summaries, markdown_table, null_note, row_columns, summarize_set, \
        write_csv
    from .fileio import check_name_part, write_json
    from .hardware import distributed
    from .testsets import load_benchmark

    check_name_part(args.suffix, "suffix")
    bench = load_benchmark(args.benchmark)
    sr_dir = Path(args.sr)
    with distributed(args.device) as runtime:
        suite = metric_suite_from(args, runtime.device)
        if args.metrics is None and not any(sr_dir.glob("*_kernel.npy")):
            suite = suite.without_kernel_metrics()  # no estimated kernels there: no kernel metrics by default
        rows, problems = evaluate_results(bench, sr_dir, suite, suffix=args.suffix, runtime=runtime)
        if not runtime.main:
            return 0  # rank 0 reports the problems and carries the exit status
        label = sr_dir.name or str(sr_dir)
        summary = summarize_set(rows, suite.names, suite, bench, [sr_dir / row["file"] for row in rows])
        json_path = Path(args.json) if args.json else sr_dir / "metrics.json"
        csv_path = Path(args.csv) if args.csv else sr_dir / "metrics.csv"
        nulls = write_json(json_path, {"benchmark": str(bench.root), "sr": str(sr_dir), "suffix": args.suffix,
                               "metrics": list(suite.names), "luma": suite.luma, "mean": summary,
                               "groups": group_summaries(rows, suite.names), "cases": rows, "problems": problems})
        write_csv(csv_path, rows, row_columns(rows, suite.names) + ["file"])
        print(markdown_table({label: summary}, suite.names), end="")
        if len({row["group"] for row in rows}) > 1:
            print()
            print(markdown_table(group_summaries(rows, suite.names), suite.names, first="kernel"), end="")
        print(f"{len(rows)} of {len(bench.cases)} case(s) scored; per-image results: {json_path}, {csv_path}")
        if nulls:
            print(null_note(str(json_path), nulls))
        return report(problems, args, processed=len(rows))


def _memory(text: str) -> int:
    from .inference import parse_memory

    try:
        return parse_memory(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).replace("max_memory=", "")) from None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 2,5,10") from None


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .evaluation import BenchmarkSettings, default_baselines, run_benchmark

    options = sample_options_from(args)
    if args.baselines is None:
        baselines = default_baselines(options)
    else:
        baselines = () if args.baselines.strip() in ("", "none") else \
            tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    settings = BenchmarkSettings(seed=args.seed, batch_size=args.batch_size, baselines=baselines, limit=args.limit,
                                 trajectory_cases=args.trajectory_cases, trajectory_steps=args.trajectory_steps,
                                 steps_sweep=args.steps_sweep, sweep_cases=args.sweep_cases,
                                 report_cases=args.report_cases)
    suite = metric_suite_from(args, "cpu")  # validated (and weights checked) before any upscaling
    outcome = run_benchmark(args.benchmark, args.weights, args.out, options=options, settings=settings,
                            suite=suite, device=args.device, precision=args.precision, config=args.config,
                            allow_pickle=args.allow_pickle, progress=not args.no_progress)
    if outcome.results is None:
        return 0  # not rank 0: rank 0 reports the problems and carries the exit status
    return report(outcome.problems, args)


def add_sampling_options(parser: argparse.ArgumentParser, default_weights: str | None = None) -> None:
    """Weights, device and reverse-process options shared by `upscale`, `deblur` and `benchmark`."""
    from .hardware import PRECISIONS
    from .inference import DEFAULT_MAX_MEMORY, DEFAULT_WEIGHTS, MODES, SampleOptions
    from .sampling import GRADIENTS, GUIDANCE, SAMPLERS

    default_weights = default_weights or DEFAULT_WEIGHTS
    perceptual, fidelity = SampleOptions.for_mode("perceptual"), SampleOptions.for_mode("fidelity")
    parser.add_argument("--weights", default=default_weights,
                        help=f"a .safetensors file or a shipped model name (default {default_weights})")
    parser.add_argument("--config", default=None, help="config for weights without one (.pt files)")
    parser.add_argument("--allow-pickle", "--allow-pt", action="store_true",
                        help="read .pt/.pth weights (with weights_only=True)")
    parser.add_argument("--mode", choices=tuple(MODES), default="perceptual",
                        help=f"perceptual: guided reverse process ({perceptual.steps} steps, ζ {perceptual.zeta:g}); "
                             f"fidelity: x̂0 in {fidelity.steps} step(s), highest PSNR. The flags below override it")
    parser.add_argument("--steps", type=int, help="reverse-process steps")
    parser.add_argument("--sampler", choices=SAMPLERS)
    parser.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--zeta", type=float, help="step size ζ of the kernel-aware gradient (paper: 1 with --gradient xt)")
    parser.add_argument("--guidance", choices=GUIDANCE,
                        help="data term between steps: noise-aware (the default: the kernel-aware term weighted by "
                             "1/σ̂² of the input's estimated noise, as MAP prescribes; equal to kernel-aware on "
                             "clean inputs), kernel-aware (the paper's), bicubic or none")
    parser.add_argument("--gradient", choices=GRADIENTS,
                        help="back-propagate the data term through the network to x_t (paper) or take it at x̂0 "
                             "(the default: no backward pass through the network)")
    parser.add_argument("--x0-norm-weight", type=float, help="weight of the release's extra ‖x̂0‖ term (release: 0.1)")
    parser.add_argument("--max-memory", type=_memory, default=None, metavar="SIZE",
                        help=f"memory the reverse process may take, e.g. 2GiB or 800MB (default "
                             f"{DEFAULT_MAX_MEMORY / 2**30:g}GiB): a larger image is processed as overlapping windows "
                             "that fit; the input and the result image come on top")
    parser.add_argument("--tile", type=int, default=None,
                        help="HR window side, overriding --max-memory (e.g. 256; default: chosen to fit it)")
    parser.add_argument("--tile-overlap", type=int, help=f"window overlap in HR pixels (default {perceptual.tile_overlap})")
    parser.add_argument("--seed", type=int, default=0, help="seed of every image")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--batch-size", type=int, default=1, help="images of the same size processed together")


def add_degradation_options(parser: argparse.ArgumentParser) -> None:
    from .degradation import DOWNSAMPLE_MODES

    parser.add_argument("--scale", type=int, default=4, help="downscaling factor s ≥ 1 (1 = blur only)")
    parser.add_argument("--downsample", choices=DOWNSAMPLE_MODES, default="bicubic",
                        help="MATLAB bicubic resize (the benchmarks) or every s-th pixel (paper Eq. 1)")
    parser.add_argument("--noise", type=float, default=0.0, help="Gaussian noise sigma on the [0, 1] scale")
    parser.add_argument("--seed", type=int, default=0, help="seed for random kernels and noise")
    parser.add_argument("--kernel-size", type=int, default=None,
                        help="kernel size (default 21; 64 for motion blur)")


def add_make_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hr", required=True, help="folder of HR images")
    parser.add_argument("--lr", default=None,
                        help="folder of real LR images with the same file names as --hr (e.g. DRealSR's camera "
                             "pairs): a test set of real pairs, no synthetic degradation and no kernels")
    parser.add_argument("--protocol", default="gaussian8",
                        help="gaussian8 | aniso | motion | real | levin | iso:SIGMA | kernels:FILE (real: the "
                             "real-world chain, noise σ ≤ 12 and JPEG 35–90; levin and kernels:FILE: every image with "
                             "every kernel of the file, e.g. Levin et al. 2009's 8 camera shakes)")
    parser.add_argument("--crop", type=int, default=None,
                        help="centre-crop every image to N×N first (Table 5: 256)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N images in name order (Table 2: the first 50 of Urban100)")
    parser.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    add_degradation_options(parser)
    parser.set_defaults(run=cmd_make_benchmark)


def add_degrade_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--kernel", default=None,
                        help="iso:SIGMA, aniso:SX,SY,THETA, motion:INTENSITY, random-iso, random-aniso, "
                             "random-motion, or a kernel file (.npy, .png, .mat)")
    parser.add_argument("--pipeline", choices=("paper", "real"), default="paper",
                        help="paper: blur with --kernel, downsample, --noise (docs/method.md §1); real: the real-world chain "
                             "(blur, resize, Gaussian/Poisson noise, JPEG, twice; seeded by --seed)")
    parser.add_argument("--config", default=None,
                        help="with --pipeline real: a YAML file or preset whose data.real settings to use "
                             "(default: the held-out protocol, noise σ ≤ 12, JPEG 35–90)")
    add_degradation_options(parser)
    parser.set_defaults(run=cmd_degrade)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="preset name (e.g. fast-x4, paper-iso-x4) or YAML file")
    parser.add_argument("--out", required=True, help="run folder (config, log.jsonl, checkpoints/, weights)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--max-minutes", type=float, metavar="M",
                        help=f"time box: checkpoint and stop after M minutes (exit {TIME_BOX_EXIT}); rerun with "
                             "--resume to continue, e.g. in ≤ 9-minute GPU chunks")
    parser.set_defaults(run=cmd_train)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    from .checkpoint import EXPORT_DTYPES

    parser.add_argument("weights", help="a shipped model name (fast-x4), weights.safetensors or "
                                        "checkpoints/step_XXXXXXXX.index.json")
    parser.add_argument("--out", required=True, help="the .safetensors (or, with --format onnx, .onnx) file to write")
    parser.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                        help="safetensors: the EMA weights with their config; onnx: the fidelity mode as one graph, "
                             "image N×3×H×W in [0, 1] → result N×3×sH×sW and kernel N×k×k (needs blinddiff[onnx])")
    parser.add_argument("--dtype", choices=tuple(EXPORT_DTYPES), default=None,
                        help="safetensors: precision of the stored tensors (default fp32; fp16: half the size, for "
                             "shipping)")
    parser.add_argument("--noise", choices=("graph", "input"), default=None,
                        help="onnx: draw the fidelity step's x_T inside the graph (default: one input, a fresh draw "
                             "each run) or take it as a second input `noise` N×3×sH×sW (reproduces `upscale --seed`)")
    parser.set_defaults(run=cmd_export)


def add_upscale_arguments(parser: argparse.ArgumentParser, default_weights: str | None = None) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--out", required=True, help="output folder")
    add_sampling_options(parser, default_weights)
    parser.add_argument("--suffix", default="", help="appended to output stems, e.g. _x4")
    parser.add_argument("--ext", choices=("png", "jpg", "auto"), default="auto", help="auto keeps JPEG as JPEG")
    parser.add_argument("--quality", type=int, default=None, metavar="Q",
                        help="JPEG quality of JPEG outputs, 1-100 (default 95)")
    parser.add_argument("--outscale", type=float, default=None, metavar="F",
                        help="resize the result to F x the input's size after the model (Lanczos), e.g. 3.5 with a "
                             "x4 model; the kernel files are unchanged")
    parser.add_argument("--save-trajectory", action="store_true", help="save x̂0 and k̂ of every step")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=cmd_upscale)


def add_deblur_arguments(parser: argparse.ArgumentParser) -> None:
    from .inference import DEFAULT_DEBLUR_WEIGHTS

    add_upscale_arguments(parser, DEFAULT_DEBLUR_WEIGHTS)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from .serve import DEFAULT_HOST, DEFAULT_PORT

    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 opens it "
                             "to the network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument("--weights", action="append", default=None, metavar="NAME_OR_FILE",
                        help="a shipped model name or a .safetensors file to offer (repeatable; default: every "
                             "shipped model, fast-x4 first)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.set_defaults(run=cmd_serve)


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset name or YAML file")
    parser.add_argument("--size", type=int, default=None, help="HR size H of the H×H forward (default: data.crop)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=cmd_info)


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON (with the full sha256 and file path)")
    parser.set_defaults(run=cmd_models)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", required=True, help="test-set folder (holds manifest.json)")
    parser.add_argument("--sr", required=True, help="folder of SR results <name><suffix>.png (+ <name>_kernel.npy)")
    parser.add_argument("--suffix", default="", help="suffix of the SR stems, e.g. _x4")
    parser.add_argument("--json", default=None, help="per-image results as JSON (default SR/metrics.json)")
    parser.add_argument("--csv", default=None, help="per-image results as CSV (default SR/metrics.csv)")
    add_metric_options(parser)
    parser.set_defaults(run=cmd_evaluate)


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluation import ALL_BASELINES, BASELINES

    parser.add_argument("--benchmark", required=True, help="test-set folder (holds manifest.json)")
    parser.add_argument("--out", required=True, help="run folder (re-running it resumes)")
    parser.add_argument("--baselines", default=None,
                        help=f"some of {','.join(ALL_BASELINES)}, or none (default {','.join(BASELINES)}, without "
                             "gt-kernel where the options use no kernel, as --mode fidelity; the peers need "
                             "`make peers` and ×4; blurry, rl-* and wiener-* are for scale 1; *-est reuse "
                             "blinddiff's kernels of the run)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only N cases, spread evenly over the set (a stated subset of a large set)")
    parser.add_argument("--trajectory-cases", type=int, default=2, help="images traced along the reverse process")
    parser.add_argument("--trajectory-steps", type=int, default=None, help="steps of those traces (default --steps)")
    parser.add_argument("--steps-sweep", type=_int_list, default=(),
                        help="step counts for quality vs steps, e.g. 2,5,10")
    parser.add_argument("--sweep-cases", type=int, default=2, help="images of the steps sweep")
    parser.add_argument("--report-cases", type=int, default=24, help="cases shown in report.html")
    parser.add_argument("--no-progress", action="store_true")
    add_sampling_options(parser)
    add_metric_options(parser, device=False)
    parser.set_defaults(run=cmd_benchmark)


# name → (help, description, add its arguments); the arguments are added only for the command being run,
# so `blinddiff --help` imports nothing heavy (torch included)
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "make-benchmark": ("build a synthetic test set (HR, LR, kernels, manifest)",
                       "Build a synthetic test set from a folder of HR images (docs/method.md §1).",
                       add_make_benchmark_arguments),
    "degrade": ("blur, downsample and quantise single images",
                "Degrade images with a given or random kernel; writes LR and kernel.", add_degrade_arguments),
    "train": ("train MCFormer (single process or under torchrun)",
              "Train MCFormer; the same command runs under torchrun for DDP.", add_train_arguments),
    "export": ("EMA weights of a run or checkpoint as one file, or a model as ONNX",
               "Write the EMA weights of a shipped model, a weights file or a checkpoint's .index.json as one "
               ".safetensors file with its config, or (--format onnx) its fidelity mode as an ONNX graph.",
               add_export_arguments),
    "upscale": ("blind super-resolution of images (MAP reverse process)",
                "Blind SR: estimates the kernel and the HR image together (docs/method.md §4).", add_upscale_arguments),
    "deblur": ("blind deblurring with a scale-1 model",
               "Blind deblurring: `upscale` with a scale-1 model (default: the shipped deblur-motion).",
               add_deblur_arguments),
    "models": ("the shipped models: setting, scale, size, sha256, sampling defaults",
               "List the models that ship with the package (pass a name to --weights); each is checked against "
               "its recorded sha256.", add_models_arguments),
    "serve": ("a web UI in the browser (Gradio, on 127.0.0.1:7860)",
              "Serve a local web page: upload a photo, pick model, mode, steps and seed, compare with bicubic, see "
              "the estimated kernel and noise level, download the result (README, Web UI).", add_serve_arguments),
    "info": ("parameters and GFLOPs of a config's network",
             "Parameter counts (total and per part) and GFLOPs of one forward.", add_info_arguments),
    "evaluate": ("score SR results of a test set (PSNR/SSIM/LPIPS/DISTS/NIQE/FID/kernels)",
                 "Score a folder of SR results against a make-benchmark test set (docs/method.md §5); works under "
                 "torchrun.", add_evaluate_arguments),
    "benchmark": ("upscale and evaluate a test set, with baselines and report.html",
                  "Upscale every case of a test set, evaluate it and the baselines, and write "
                  "results.json/.csv/.md and report.html; resumable; works under torchrun.",
                  add_benchmark_arguments),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The `blinddiff` parser; only the named `commands` get their arguments (None: all of them)."""
    parser = argparse.ArgumentParser(prog="blinddiff", description="Blind super-resolution with diffusion (BlindDiff).")
    parser.add_argument("--version", action="version", version=f"blinddiff {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, description, add_arguments) in COMMANDS.items():
        command = subparsers.add_parser(name, help=help, description=description)
        if commands is None or name in commands:
            add_arguments(command)
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


@contextlib.contextmanager
def input_warnings_as_lines(args: argparse.Namespace) -> Iterator[None]:
    """Print each `fileio.InputWarning` (a first frame only, a dropped alpha, skipped outputs) as one line
    `blinddiff: warning: …` on stderr, every time; other warnings are shown as usual."""
    import warnings

    from .fileio import InputWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", InputWarning)
        usual = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
            if issubclass(category, InputWarning):
                print(f"blinddiff: warning: {with_flags(str(message), args)}", file=sys.stderr)
            else:
                usual(message, category, *rest, **kwargs)

        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 1 some input or the run failed, 2 bad arguments or setup."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser([word for word in argv if word in COMMANDS][:1]).parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    stdout, sys.stdout = sys.stdout, PipeSafeStdout(sys.stdout)
    try:
        with input_warnings_as_lines(args):
            return run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"blinddiff {args.command}: error: {with_flags(str(err), args)}", file=sys.stderr)
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
