"""File size of the LeNet-300-100 Sparse VD model: compressed file vs the dense float32 state_dict.

Needs ``results/lenet300_vd_model.safetensors`` (written by
``python examples/lenet300_mnist.py --epochs 200 --save-model benchmarks/results/lenet300_vd_model.safetensors``).
For each value encoding it saves the thresholded model with ``bayes_sparse.export.save``, loads the file
back (no pickle) into the unmodified architecture, and measures the MNIST test error. The reference size
is ``torch.save(dense_model.state_dict())``. Writes ``results/file_size.json``.

    python benchmarks/file_size.py
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

import bayes_sparse as bs

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from lenet300_mnist import lenet300  # noqa: E402


def main() -> None:
    model_path = RESULTS / "lenet300_vd_model.safetensors"
    if not model_path.exists():
        raise SystemExit(f"{model_path} is missing; run examples/lenet300_mnist.py --epochs 200 --save-model {model_path}")
    net = lenet300()
    try:  # written by bs.export.save_checkpoint (the example's --save-model)
        bs.export.load_checkpoint(net, model_path)
    except ValueError:  # an older file: a plain safetensors state_dict with the legacy mask_fixed buffers
        net.load_state_dict(load_file(str(model_path)))
    mnist = bs.data.load_mnist()
    dense = bs.to_dense(net).eval()
    buf = io.BytesIO()
    torch.save(dense.state_dict(), buf)
    dense_bytes = len(buf.getvalue())
    base_err = bs.error_rate(dense, mnist.x_test, mnist.y_test)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for values, tol in [("float32", None), ("float16", None), ("bfloat16", None), (8, None), (6, None),
                            (5, None), (4, None), ("auto", 0.25), ("auto", 0.1)]:
            path = Path(tmp) / "m.safetensors"
            rep = bs.export.save(net, path, values=values, **({"tolerance": tol} if tol else {}))
            back = bs.export.load(path, model=lenet300(nn.Linear))
            err = bs.error_rate(back, mnist.x_test, mnist.y_test)
            row = {"values": values, "tolerance": tol, "total_bytes": rep.total_bytes, "ratio": dense_bytes / rep.total_bytes,
                   "test_error_percent": 100 * err, "error_change_pp": 100 * (err - base_err),
                   "layers": rep.layers}
            rows.append(row)
            label = f"{values}" + (f"@{tol}" if tol else "")
            print(f"values={label:9s} {rep.total_bytes:8,d} bytes  {row['ratio']:6.1f}x smaller  "
                  f"test error {100 * err:.2f}% ({row['error_change_pp']:+.2f} pp)")
    out = {"model": str(model_path), "dense_state_dict_bytes": dense_bytes, "dense_test_error_percent": 100 * base_err,
           "nonzero_weights": bs.report(dense).nonzero, "rows": rows,
           "deep_compression_lenet300": {"ratio": 40, "bytes": 27 * 1024, "error_percent": 1.58},
           "command": "python benchmarks/file_size.py"}
    (RESULTS / "file_size.json").write_text(json.dumps(out, indent=2))
    print(f"dense torch.save: {dense_bytes:,} bytes, test error {100 * base_err:.2f}%; wrote {RESULTS / 'file_size.json'}")


if __name__ == "__main__":
    main()
