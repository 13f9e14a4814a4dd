"""Dense convolutions through oneDNN against ``compile``'s ``dense_native`` (torch's own kernel, oneDNN off).

Times, side by side in one process (one thread, ``torch.utils.benchmark``), LeNet-5-Caffe's convolutions at
their full widths (1->20, 20->50) and at the widths a shrunk network keeps (1->8, 8->17), at batch 1 and 64,
each as a plain ``nn.Conv2d`` call (oneDNN on this CPU) and as a ``SparseKernel(conv, "dense_native")``.
Writes ``results/conv_backends.json``.

    python benchmarks/conv_backends.py      # about 20 s
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

from bayes_sparse.export import DENSE_NATIVE, SparseKernel

RESULTS = Path(__file__).parent / "results"
SHAPES = [("conv1 1->20", 1, 20, 28), ("conv2 20->50", 20, 50, 12), ("conv1 1->8", 1, 8, 28),
          ("conv2 8->17", 8, 17, 12)]


def seconds(fn, x) -> float:
    return benchmark.Timer("f(x)", globals={"f": fn, "x": x}, num_threads=1).blocked_autorange(
        min_run_time=0.3).median


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows = []
    with torch.inference_mode():
        for name, cin, cout, size in SHAPES:
            conv = nn.Conv2d(cin, cout, 5).eval()
            native = SparseKernel(conv, DENSE_NATIVE)
            for batch in (1, 64):
                x = torch.randn(batch, cin, size, size)
                torch.testing.assert_close(native(x), conv(x), rtol=1e-4, atol=1e-5)
                t_onednn, t_native = seconds(conv, x), seconds(native, x)
                rows.append({"layer": name, "batch": batch, "onednn_us": 1e6 * t_onednn, "native_us": 1e6 * t_native,
                             "native_speedup": t_onednn / t_native})
                print(f"{name:14s} batch {batch:2d}: oneDNN {1e6 * t_onednn:7.1f} us, dense_native "
                      f"{1e6 * t_native:7.1f} us ({t_onednn / t_native:.2f}x)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "conv_backends.json"
    out.write_text(json.dumps({"rows": rows, "torch": torch.__version__, "machine": platform.machine(),
                               "command": "python benchmarks/conv_backends.py"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
