"""Collect ``results/<net>_<method>*.json`` into a table (``results/summary.md``) and an error-vs-compression
plot (``results/summary.png``) beside the published anchors (shared/ANCHORS.md).

    python benchmarks/summarize.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ANCHORS = {  # (net, label): (test error %, compression)
    ("lenet300", "SparseVD paper"): (1.92, 68), ("lenet300", "Han et al. magnitude"): (1.59, 12),
    ("lenet300", "DNS"): (1.99, 56), ("lenet5", "SparseVD paper"): (0.75, 280),
    ("lenet5", "Han et al. magnitude"): (0.77, 12), ("lenet5", "DNS"): (0.91, 111),
}


def load_rows() -> list[dict]:
    rows = []
    for path in sorted(RESULTS.glob("lenet*.json")):
        d = json.loads(path.read_text())
        if "net" not in d and "LeNet-300" in d.get("net", d.get("method", "")):
            continue
        net = d.get("net", "")
        net = {"LeNet-300-100": "lenet300"}.get(net, net)
        if net not in ("lenet300", "lenet5"):
            continue
        method = d.get("method", "")
        method = "vd" if method.startswith("Sparse VD") else method
        opts = d.get("method_options") or {}
        label = method + (f" (penalty {opts['penalty']})" if "penalty" in opts else "")
        if method == "magnitude" and d.get("magnitude_final_sparsity") is not None:
            label += f" (sparsity {d['magnitude_final_sparsity']}, {d.get('magnitude_scope') or 'layer'})"
        rows.append({"file": path.name, "net": net, "method": label, "epochs": d["epochs"],
                     "error": d["test_error_percent"], "compression": d["compression"],
                     "sparsity": d["sparsity_per_layer_percent"],
                     "seconds": d.get("seconds", d.get("train_seconds"))})
    return rows


def main() -> None:
    rows = load_rows()
    lines = ["| net | method | epochs | test error % | compression | sparsity per layer % | train s | file |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["net"], r["method"], r["epochs"])):
        lines.append(f"| {r['net']} | {r['method']} | {r['epochs']} | {r['error']:.2f} | {r['compression']:.1f}x | "
                     f"{'-'.join(f'{s:.1f}' for s in r['sparsity'])} | {r['seconds']:.0f} | {r['file']} |")
    lines += ["", "Published anchors (shared/ANCHORS.md): " + "; ".join(
        f"{net} {label}: {e}% at {c}x" for (net, label), (e, c) in ANCHORS.items())]
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, net in zip(axes, ("lenet300", "lenet5")):
        for r in (r for r in rows if r["net"] == net):
            ax.scatter(r["compression"], r["error"], s=40)
            ax.annotate(f"{r['method']}, {r['epochs']} ep", (r["compression"], r["error"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        for (n, label), (e, c) in ANCHORS.items():
            if n == net:
                ax.scatter(c, e, marker="*", s=120, color="black")
                ax.annotate(label, (c, e), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel("compression (total / non-zero weights)")
        ax.set_ylabel("test error (%)")
        ax.set_title({"lenet300": "LeNet-300-100", "lenet5": "LeNet-5-Caffe"}[net] + " on MNIST (stars: papers)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "summary.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
