"""The ONNX export against PyTorch: PSNR-Y (studio swing, `scale` pixels cropped, as `evaluate`) on a
`make-benchmark` test set of `upscale --mode fidelity --seed S` (`BlindDiff.upscale`), of the exported graph
run with onnxruntime (CPU) fed that run's x_T (`export --noise input`), and of the same graph drawing x_T
inside it (`export`'s default), averaged over `--draws` seeded draws. README, "Export to ONNX".

    python benchmarks/onnx_parity.py --benchmark /tmp/onnx_set5 --weights fast-x4 [--onnx m.onnx]

`--onnx` reuses a graph written by `blinddiff export W --format onnx --noise input` (else the script
exports one into `--work`); the in-graph form is made from it with `draw_noise_in_graph`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from blinddiff.sampling import PositionalNoise
from blinddiff.fileio import read_rgb, rgb_to_tensor, write_json
from blinddiff.inference import BlindDiff
from blinddiff.metrics import evaluate_pair
from blinddiff.onnx_export import draw_noise_in_graph, export_onnx
from blinddiff.testsets import load_benchmark


def session(model: bytes, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, help="a make-benchmark test set (holds manifest.json)")
    parser.add_argument("--weights", default="fast-x4", help="shipped name or weights file (default fast-x4)")
    parser.add_argument("--onnx", default=None, help="an `export --format onnx --noise input` graph of --weights")
    parser.add_argument("--work", default="onnx_parity", help="where the script's export goes (without --onnx)")
    parser.add_argument("--seed", type=int, default=0, help="the --seed of `upscale`")
    parser.add_argument("--draws", type=int, default=3, help="seeded draws of the in-graph noise")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the per-image rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bench = load_benchmark(args.benchmark)
    model = BlindDiff.from_pretrained(args.weights, device="cpu")
    path = Path(args.onnx) if args.onnx else Path(args.work) / "fidelity-noise-input.onnx"
    if not args.onnx:
        path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(args.weights, path, noise="input")
    given_noise = session(path.read_bytes(), args.threads)
    drawn = []
    for draw in range(args.draws):
        proto = onnx.load(str(path))
        draw_noise_in_graph(proto, bench.scale, seed=draw + 1)  # (onnxruntime takes seed 0 as 1)
        drawn.append(session(proto.SerializeToString(), args.threads))

    rows = []
    print("| image | torch fidelity | ONNX, torch's x_T | Δ | max |pixel Δ| | ONNX, x_T in the graph | Δ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case in bench.cases:
        lr = rgb_to_tensor(read_rgb(bench.root / case["lr"]))
        hr = read_rgb(bench.root / case["hr"])
        sr, _ = model.upscale(lr, mode="fidelity", seed=args.seed)
        hr = hr[: sr.shape[-2], : sr.shape[-1]]
        x_t = PositionalNoise([args.seed])(0, 3, (0, 0, *sr.shape[-2:]), torch.device("cpu"), torch.float32)
        (from_input, _) = given_noise.run(None, {"image": lr.numpy(), "noise": x_t.numpy()})

        def psnr_y(image: torch.Tensor | np.ndarray) -> float:
            return evaluate_pair(torch.as_tensor(image), hr, scale=bench.scale, metrics=("psnr",))["psnr"]

        row = {"name": case["name"], "torch": psnr_y(sr), "onnx_input_noise": psnr_y(from_input),
               "max_pixel_difference": float(np.abs(from_input - sr.numpy()).max()),
               "onnx_graph_noise": [psnr_y(graph.run(None, {"image": lr.numpy()})[0]) for graph in drawn]}
        rows.append(row)
        graph_mean = float(np.mean(row["onnx_graph_noise"]))
        print(f"| {row['name']} | {row['torch']:.3f} | {row['onnx_input_noise']:.3f} | "
              f"{row['onnx_input_noise'] - row['torch']:+.4f} | {row['max_pixel_difference']:.1e} | "
              f"{graph_mean:.3f} | {graph_mean - row['torch']:+.4f} |", flush=True)
    torch_mean = float(np.mean([r["torch"] for r in rows]))
    input_mean = float(np.mean([r["onnx_input_noise"] for r in rows]))
    graph_means = [float(np.mean([r["onnx_graph_noise"][d] for r in rows])) for d in range(args.draws)]
    print(f"| **mean** | {torch_mean:.3f} | {input_mean:.3f} | {input_mean - torch_mean:+.4f} | "
          f"{max(r['max_pixel_difference'] for r in rows):.1e} | {np.mean(graph_means):.3f} | "
          f"{np.mean(graph_means) - torch_mean:+.4f} |")
    print(f"set means of the {args.draws} in-graph draws: "
          + ", ".join(f"{m:.3f} ({m - torch_mean:+.4f})" for m in graph_means))
    if args.out:
        write_json(args.out, {"benchmark": str(bench.root), "weights": args.weights, "seed": args.seed,
                              "torch_mean": torch_mean, "onnx_input_noise_mean": input_mean,
                              "onnx_graph_noise_means": graph_means, "cases": rows})


if __name__ == "__main__":
    main()
