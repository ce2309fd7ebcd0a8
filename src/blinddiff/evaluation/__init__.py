"""The evaluation suite: the paper's tables from one command (docs/method.md §5 "Metrics"; paper §4, Fig. 7).

* `scoring` — :func:`evaluate_results` scores a folder of SR results against a synthetic test set written by
  ``blinddiff make-benchmark`` (``manifest.json``): PSNR/SSIM (Y, ``scale`` border; studio-swing or
  full-range luma), LPIPS-VGG, LPIPS-Alex, DISTS, NIQE, kernel L1 and LR-PSNR per image
  (``blinddiff.metrics``), FID over the set; the means of the tables.
* `runner` — :func:`run_benchmark` upscales every case with the blind MAP reverse process and the baselines,
  evaluates them, and writes the outputs; finished cases are recorded one file each, so a run resumes.
  `context` holds its settings and the run context its steps share.
* `baselines` — the registry of the rows next to the method: plain bicubic ×s; the same model in non-blind
  mode with the ground-truth kernel; on request the peer methods of ``blinddiff.peers`` (Real-ESRGAN,
  RealSR, SRMD given the true or our estimated kernel); at scale 1 the blurry input itself and
  Richardson–Lucy / Wiener deconvolution given the true or our estimated kernel.
* `report` — ``results.json/.csv/.md`` and a self-contained ``report.html`` with crops, kernels and
  matplotlib plots: Fig. 7a (per-step PSNR of x̂0 and kernel L1 along the reverse process), quality
  against the number of steps, and perception–distortion (PSNR vs LPIPS-VGG, one point per method).
* Both commands shard their cases across ``torchrun`` ranks (case i → rank i mod world) and gather the
  per-case results on rank 0, which alone writes the tables: the numbers do not depend on the
  number of processes.
* The pieces live where they belong: the test set in ``blinddiff.testsets``, the metric suite in
  ``blinddiff.metrics``, the torchrun ranks in ``blinddiff.hardware``, the commands in ``blinddiff.cli``
  and speed measurement in ``benchmarks/sampling_speed.py``; this package imports none of the CLI.

Run folder layout (``benchmark``): ``<method>/<name>.png`` (+ ``<name>_kernel.npy/.png`` for the
blind method, the files ``blinddiff upscale`` writes, so ``evaluate --sr RUN/blinddiff`` gives the
same numbers), ``<method>/records/<name>.json`` (one per finished case), ``plots/``, ``report/``.
"""

from .baselines import ALL_BASELINES, BASELINES, METHOD, Producer, default_baselines
from .context import BenchmarkSettings
from .report import case_pictures, line_plot, markdown_table, null_note, row_columns, save_figure, scatter_plot, \
    write_csv
from .runner import BenchmarkOutcome, run_benchmark
from .scoring import evaluate_results, find_result, group_summaries, summarize, summarize_set

__all__ = [
    "ALL_BASELINES", "BASELINES", "METHOD", "BenchmarkOutcome", "BenchmarkSettings", "Producer", "case_pictures",
    "default_baselines", "evaluate_results", "find_result", "group_summaries", "line_plot", "markdown_table",
    "null_note", "row_columns", "run_benchmark", "save_figure", "scatter_plot", "summarize", "summarize_set",
    "write_csv",
]
