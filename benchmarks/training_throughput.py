"""Training throughput and model-FLOP utilisation of presets.

Prints, in one run on an otherwise idle machine:
  * the roofline: dense 3×3 convolution (channels-last) and matrix-product TFLOP/s in --precision
    (bf16 by default; fp32 on a CPU without fast bf16, where bf16 is ~10× slower), the precision the
    trainer runs in too, so the MFU is against the roofline of the precision used;
  * per preset and --variants entry (one row each), patches/s of the real trainer
    (`blinddiff.train.train`: data pipeline, degradation, diffusion loss, backward, Adam, EMA) at --crop²
    crops, measured over the second half of the steps so start-up and compilation are excluded, and its
    MFU = model FLOP/s ÷ the best conv roofline, where model FLOPs per step = 3 × the network's forward
    FLOPs (2 per multiply-add, convolutions and matrix products only; `step_flops`);
  * the share of a step the degradation takes (it runs in the loop; measured separately).

    python benchmarks/training_throughput.py --presets small-x4 fast-x4 --steps 40
    python benchmarks/training_throughput.py --presets fast-x4 --precision fp32 \
        --variants "dw:" "g16:model.mixer_group_width=16 model.ffn_expansion=2.667"
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import time_calls

from blinddiff.config import load_config
from blinddiff.data import TrainingDegradation
from blinddiff.model import MCFormer, count_parameters, describe_complexity
from blinddiff.train import train


def best_seconds(fn, repeats: int = 5) -> float:
    """Fastest of `repeats` timed calls after one warm-up call (the roofline is a best case)."""
    return min(time_calls(fn, repeats))


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def roofline(precision: str) -> dict[str, float]:
    """TFLOP/s of a dense 3×3 conv (64→64 and 128→128 channels, channels-last) and a 2048² matmul in
    `precision` ("bf16" | "fp32")."""
    dtype = DTYPES[precision]
    result = {}
    with torch.no_grad():
        for channels, size in ((64, 64), (128, 32)):
            x = torch.randn(16, channels, size, size).to(dtype, memory_format=torch.channels_last)
            w = torch.randn(channels, channels, 3, 3).to(dtype, memory_format=torch.channels_last)
            flops = 2 * 16 * size * size * channels * channels * 9
            result[f"conv3x3_{channels}ch"] = flops / best_seconds(lambda: F.conv2d(x, w, padding=1)) / 1e12
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        result["matmul_2048"] = 2 * 2048**3 / best_seconds(lambda: a @ b) / 1e12
    return result


def parse_variant(text: str) -> tuple[str, list[str]]:
    """"label:a.b=c x.y=z" → (label, ["a.b=c", "x.y=z"]); "label:" is the preset as it is."""
    label, colon, overrides = text.partition(":")
    if not colon or not label:
        raise argparse.ArgumentTypeError(f"variant {text!r} must be LABEL:OVERRIDES (overrides may be empty)")
    return label, overrides.split()


def step_flops(cfg) -> float:
    """Model FLOPs of one training step per patch: 3 × the forward's (backward ≈ 2 × forward, the usual MFU
    convention, as nanoGPT and PaLM count). torch's FlopCounterMode counts the forward exactly, grouped
    convolutions (any ``model.mixer_group_width``) included, but its formula for ``convolution_backward``
    ignores groups and overcounts depth-wise convolutions ~20×."""
    return 3e9 * describe_complexity(cfg.model, cfg.data.crop, cfg.data.scale)["gflops"]


def degradation_seconds(cfg) -> float:
    degradation = TrainingDegradation.from_config(cfg.data)
    hr = torch.rand(cfg.train.batch_size, 3, cfg.data.crop, cfg.data.crop)
    generator = torch.Generator().manual_seed(0)
    return best_seconds(lambda: degradation(hr, generator))


def trainer_patches_per_s(cfg) -> float:
    """patches/s of `train()` over the second half of cfg.train.steps (one log window)."""
    with tempfile.TemporaryDirectory() as run:
        train(cfg, run, progress=False)
        records = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "patches_per_s" in r][-1]["patches_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small-x4", "fast-x4"])
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="trainer steps per preset (the second half is timed)")
    parser.add_argument("--precision", choices=tuple(DTYPES), default="bf16",
                        help="of the trainer (train.precision) and of the roofline the MFU is taken against")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (minutes per preset)")
    parser.add_argument("--set", action="append", default=[], help="override for every preset, a.b=c")
    parser.add_argument("--variants", nargs="+", type=parse_variant, default=[("", [])], metavar="LABEL:OVERRIDES",
                        help='one row per preset and variant, e.g. "dw:" "g16:model.mixer_group_width=16 '
                             'model.ffn_expansion=2.667" (overrides space-separated, after --set)')
    args = parser.parse_args()

    torch.set_num_threads(torch.get_num_threads())  # both cores (the default)
    roof = roofline(args.precision)
    print(f"threads {torch.get_num_threads()}; {args.precision} roofline: "
          + ", ".join(f"{name} {value:.2f} TFLOP/s" for name, value in roof.items()))
    peak = max(v for k, v in roof.items() if k.startswith("conv"))
    rows = []
    half = args.steps // 2
    for preset in args.presets:
        for label, overrides in args.variants:
            cfg = load_config(preset, [f"data.crop={args.crop}", f"train.steps={args.steps}",
                                       f"train.log_every={half}", f"train.checkpoint_every={args.steps}",
                                       f"train.precision={args.precision}", f"train.compile={args.compile}",
                                       *args.set, *overrides])
            flops = step_flops(cfg)
            rate = trainer_patches_per_s(cfg)
            degrade = degradation_seconds(cfg)
            step_time = cfg.train.batch_size / rate
            rows.append((f"{preset} {label}".strip(), count_parameters(MCFormer(cfg.model)), cfg.train.batch_size,
                         rate, flops, rate * flops / 1e12, degrade / step_time))
    base = rows[0][3]
    print(f"\n| preset | parameters | batch | patches/s at {args.crop}² | × {rows[0][0]} | GFLOP/patch (fwd+bwd) "
          f"| TFLOP/s | MFU (of best {args.precision} conv roofline) | degradation share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, params, batch, rate, flops, tflops, share in rows:
        print(f"| {name} | {params / 1e6:.2f} M | {batch} | {rate:.1f} | {rate / base:.1f} | {flops / 1e9:.2f} "
              f"| {tflops:.3f} | {100 * tflops / peak:.1f} % | {100 * share:.1f} % |")


if __name__ == "__main__":
    main()
