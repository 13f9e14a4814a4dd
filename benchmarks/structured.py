"""Structured sparsity on MNIST: neurons/channels kept, test error, and the measured speed of the shrunk network.

Trains LeNet-5-Caffe (20-50-800-500) or LeNet-300-100 with a group method (``group_l0``: a hard-concrete gate
per unit; ``group_vd``: Bayesian group variational dropout), thresholds it, shrinks it physically
(:func:`bayes_sparse.export.shrink`) and measures, side by side in one process (interleaved rounds, median,
1 thread), the dense original against the shrunk network at batch 1 and batch 64, in torch (eager, and both
traced, frozen and optimized for inference by TorchScript) and in onnxruntime (when installed), and the shrunk
network again through ``export.compile(kernel="auto")`` (beside the dense original compiled alike).

Units are counted as the anchors count them (``../shared/ANCHORS.md``, "Structured"): LeNet-5 conv1 and conv2
output channels, then the inputs of fc1 and fc2; LeNet-300-100 the inputs of its three layers.

    python benchmarks/structured.py --net lenet5 --method group_l0 --epochs 100      # ~1 h on one thread
    python benchmarks/structured.py --net lenet300 --method group_l0 --epochs 100
    python benchmarks/structured.py --from-checkpoint benchmarks/results/structured_lenet5_group_l0_model.safetensors
    python benchmarks/structured.py --recipe sep2x --from-checkpoint CKPT --finetune-epochs 20 --out OUT.json
    python benchmarks/structured.py --plot                                           # the figure of every result

Each run writes ``benchmarks/results/structured_<net>_<method>.json`` and its model checkpoint beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs
from bayes_sparse.bench import metrics as bench_metrics

sys.path.insert(0, str(Path(__file__).parent))
from mnist_methods import NETS  # noqa: E402

RESULTS = Path(__file__).parent / "results"

#: Per-layer options by (net, method, recipe). LeNet-5 "sep" is the L0 paper's per-layer penalty
#: (10, 0.5, 0.1, 10 in units of 1/N for conv1, conv2, fc1, fc2); gates on conv output channels and on
#: the inputs of the fully connected layers, as the paper counts them.
LAYERS = {
    "lenet5": ["1", "4", "8", "10"],
    "lenet300": ["0", "2", "4"],
}
UNITS = {  # which side of each layer the anchors count
    "lenet5": ["out", "out", "in", "in"],
    "lenet300": ["in", "in", "in"],
}
PENALTIES = {
    ("lenet5", "group_l0", "sep"): [10.0, 0.5, 0.1, 10.0],
    ("lenet5", "group_l0", "paper"): [0.1, 0.1, 0.1, 0.1],
    # L0-sep with the two convolutions' penalties doubled (500/N per channel instead of 250/N): "sep" kept
    # 11-21 channels against the paper's 9-18
    ("lenet5", "group_l0", "sep2x"): [20.0, 1.0, 0.1, 10.0],
    # half-way: sep2x reached 8-14 channels but at 1.21% error, sep 11-21 at 0.98%
    ("lenet5", "group_l0", "sep1.5x"): [15.0, 0.75, 0.1, 10.0],
    # convolutions x3, towards BC-GHS's 5-10 channels: with the gated L2 (--weight-decay 30) sep1.5x kept 10-15
    # channels at 0.78% error
    ("lenet5", "group_l0", "sep3x"): [30.0, 1.5, 0.1, 10.0],
    ("lenet300", "group_l0", "paper"): [0.1, 0.1, 0.1],
    # stronger: "paper" kept 249-234-100 at 1.34%, far more hidden units than the anchor's 266-88-33 at ~1.6%
    ("lenet300", "group_l0", "paper3x"): [0.3, 0.3, 0.3],
}
ANCHORS = {
    "lenet5": {"L0 (Louizos 2018)": ([20, 25, 45, 462], 0.9), "L0-sep": ([9, 18, 65, 25], 1.0),
               "BC-GNJ": ([8, 13, 88, 13], 1.0), "BC-GHS": ([5, 10, 76, 16], 1.0),
               "SBP": ([3, 18, 284, 283], 0.86)},
    "lenet300": {"L0 (Louizos 2018)": ([266, 88, 33], 1.6)},
}


def build(net_name: str, method: str, recipe: str, warmup: tuple[float, float], per_weight: bool = False,
          weight_decay: float = 0.0) -> nn.Module:
    """The net with ``method`` on every layer. ``group_l0`` gates the units the anchors count (``UNITS``);
    ``group_vd`` scales output units, so its last layer (whose outputs are the classes) takes per-weight ``vd``;
    with ``per_weight`` the other layers also carry Sparse VD per weight (units and weights both pruned).
    ``weight_decay`` is group L0's gated L2 strength on every layer (units of 1/N; the L0 code's 5e-4 is 30)."""
    net = NETS[net_name]()
    names = LAYERS[net_name]
    for i, (name, unit) in enumerate(zip(names, UNITS[net_name])):
        if method == "group_l0":
            options = {"unit": unit, "penalty": PENALTIES[(net_name, method, recipe)][i], "weight_decay": weight_decay}
            if net_name == "lenet300" and i == 0:
                options["droprate_init"] = 0.2  # the paper's initial drop rate on an MLP's input layer
            net = bs.sparsify(net, "group_l0", include=[name], warmup=warmup, **options)
        elif name == names[-1]:
            net = bs.sparsify(net, "vd", include=[name], warmup=warmup)
        else:
            net = bs.sparsify(net, "group_vd", include=[name], warmup=warmup, per_weight=per_weight)
    return net


def cap_units_(net_name: str, model: nn.Module, caps: list[int]) -> list[int]:
    """Fix each gated layer's mask to at most ``caps[i]`` of its kept units (the anchors' count, ``UNITS``), the
    units with the largest log alpha (the gate criterion's own order); returns the units kept per layer."""
    from bayes_sparse.layers import _units as U
    modules = dict(model.named_modules())
    if len(caps) != len(LAYERS[net_name]):
        raise ValueError(f"--max-units needs {len(LAYERS[net_name])} numbers for {net_name}, got {caps}")
    with torch.no_grad():
        for name, unit, cap in zip(LAYERS[net_name], UNITS[net_name], caps):
            layer = modules[name]
            if getattr(layer, "unit", None) != unit:
                raise ValueError(f"layer {name} does not gate its {unit!r} units; --max-units needs group_l0 as built "
                                 "by this script")
            mask = layer.hard_mask()
            alive = U.unit_alive(layer, mask, unit)
            score = layer.log_alpha.masked_fill(~alive, float("-inf"))
            keep = torch.zeros_like(alive)
            keep[score.topk(min(cap, int(alive.sum()))).indices] = True
            layer.set_mask_(mask & U.to_weight(layer, keep & alive, unit))
    return units_kept(net_name, model)


def units_kept(net_name: str, model: nn.Module) -> list[int]:
    """The anchors' count: output channels kept for conv layers, inputs read for fc layers (eval-time weights)."""
    modules = dict(model.named_modules())
    kept = []
    for name, unit in zip(LAYERS[net_name], UNITS[net_name]):
        layer = modules[name]
        w = (layer.masked_weight() if isinstance(layer, bs.layers.SparseLayer) else layer.weight).detach()
        flat = w.flatten(1) if unit == "out" else w.transpose(0, 1).flatten(1)
        kept.append(int((flat != 0).any(1).sum()))
    return kept


def _epoch(net: nn.Module, opt: torch.optim.Optimizer, data: bs.data.MNIST, batch_size: int, regularized: bool,
           lr: float = 0.0) -> float:
    """One pass over the training set in random minibatches; returns the mean loss. ``regularized`` adds the
    sparse layers' regularizer / N and runs their step hook (at learning rate ``lr``); else cross-entropy only."""
    n = data.x_train.shape[0]
    perm = torch.randperm(n)
    total = 0.0
    for i in range(0, n, batch_size):
        idx = perm[i:i + batch_size]
        loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
        if regularized:
            loss = loss + bs.regularizer(net) / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if regularized:
            bs.after_step(net, lr, n)
        total += float(loss.detach()) * len(idx)
    return total / n


def train(net_name: str, net: nn.Module, data: bs.data.MNIST, epochs: int, lr: float, batch_size: int, seed: int,
          log: Callable[[str], None]) -> list[dict]:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    curve = []
    for epoch in range(epochs):
        factor = 1.0 if epoch < epochs // 2 else (epochs - epoch) / (epochs - epochs // 2)  # flat, then to 0
        for group in opt.param_groups:
            group["lr"] = lr * factor
        bs.on_epoch_start(net, epoch, epochs)
        net.train()
        loss = _epoch(net, opt, data, batch_size, regularized=True, lr=lr * factor)
        net.eval()
        err = bs.error_rate(net, data.x_test, data.y_test)
        row = {"epoch": epoch, "loss": loss, "test_error": err, "units": units_kept(net_name, net)}
        curve.append(row)
        log(f"epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}, test error {100 * err:.2f}%, units {row['units']}")
    return curve


def finetune(net_name: str, net: nn.Module, data: bs.data.MNIST, epochs: int, lr: float, batch_size: int,
             seed: int, log: Callable[[str], None]) -> list[dict]:
    """Fine-tune a thresholded model with its structure fixed: the layers in eval mode (deterministic test-time
    gates, no noise), cross-entropy only, Adam with the learning rate decaying linearly to 0. Removed units
    stay removed (the fixed masks zero their weights and gradients); the kept weights adapt to the pruned
    network. The number of epochs is fixed beforehand; the test set is only logged, never used to choose."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.eval()
    curve = []
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * (epochs - epoch) / epochs
        _epoch(net, opt, data, batch_size, regularized=False)
        err = bs.error_rate(net, data.x_test, data.y_test)
        curve.append({"epoch": epoch, "test_error": err, "units": units_kept(net_name, net)})
        log(f"fine-tune epoch {epoch + 1}/{epochs}: test error {100 * err:.2f}%, units {curve[-1]['units']}")
    return curve


def time_side_by_side(models: dict[str, Union[Callable[[torch.Tensor], object], dict[int, Callable]]],
                      inputs: dict[int, torch.Tensor], rounds: int = 15,
                      min_seconds: float = 0.02) -> dict[int, dict[str, float]]:
    """Median seconds per call of each model at each batch size, interleaved rounds, 1 thread. A model given as
    ``{batch: callable}`` (one compiled for each batch size) runs its own callable at each batch."""
    out = {}
    for batch, x in inputs.items():
        reps = {}
        at_batch = {name: fn[batch] if isinstance(fn, dict) else fn for name, fn in models.items()}
        for name, fn in at_batch.items():  # warm up and size the repetitions to ~min_seconds
            fn(x)
            start, k = time.perf_counter(), 0
            while time.perf_counter() - start < min_seconds:
                fn(x)
                k += 1
            reps[name] = max(1, k)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(rounds):
            for name, fn in at_batch.items():
                start = time.perf_counter()
                for _ in range(reps[name]):
                    fn(x)
                times[name].append((time.perf_counter() - start) / reps[name])
        out[batch] = {name: statistics.median(v) for name, v in times.items()}
    return out


def onnx_runners(models: dict[str, nn.Module], example: torch.Tensor, folder: Path) -> tuple[dict, dict]:
    try:
        import onnxruntime as ort
    except ImportError:
        return {}, {}
    runners, sizes = {}, {}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    for name, model in models.items():
        path = folder / f"{name}.onnx"
        bs.export.onnx.to_onnx(model, example, path)
        sizes[name] = path.stat().st_size
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        runners[f"onnx_{name}"] = (lambda s, i: (lambda x: s.run(None, {i: x.numpy()})))(session, input_name)
    return runners, sizes


def evaluate(net_name: str, sparse: nn.Module, data: bs.data.MNIST, log: Callable[[str], None],
             inductor: bool = False) -> dict:
    """Threshold (already done), shrink, check, time (with ``inductor``, also both models under torch.compile)."""
    torch.set_num_threads(1)
    sparse.eval()
    exported = bs.to_dense(sparse).eval()
    example = data.x_test[:8]
    shrunk = bs.export.shrink(exported, example)
    err_sparse = bs.error_rate(sparse, data.x_test, data.y_test)
    err_shrunk = bs.error_rate(shrunk, data.x_test, data.y_test)
    with torch.no_grad():
        gap = float((shrunk(data.x_test[:1000]) - exported(data.x_test[:1000])).abs().max())
    params_dense = sum(p.numel() for p in NETS[net_name]().parameters())
    params_shrunk = sum(p.numel() for p in shrunk.parameters())
    nonzero_shrunk = sum(int((p != 0).sum()) for p in shrunk.parameters())
    log(f"shrunk: error {100 * err_shrunk:.2f}% (thresholded model {100 * err_sparse:.2f}%), parameters "
        f"{params_dense} -> {params_shrunk}, max output gap {gap:.2e}")
    reference = NETS[net_name]().eval()  # the unpruned architecture: the dense original every speedup is against
    # compile(kernel="auto") picks each layer's kernel by timing it at one batch size: one model per batch timed
    compiled = {b: bs.export.compile(shrunk, kernel="auto", batch_size=b, threads=1, example_input=example[:1])
                for b in (1, 64)}
    dense_compiled = {b: bs.export.compile(reference, kernel="auto", batch_size=b, threads=1,
                                           example_input=example[:1]) for b in (1, 64)}
    models = {"dense": reference, "shrunk": shrunk, "shrunk_compiled_auto": compiled,
              "dense_compiled_auto": dense_compiled}
    models["torchscript_dense"] = torchscript_frozen(reference, example[:1])
    models["torchscript_shrunk"] = torchscript_frozen(shrunk, example[:1])
    if inductor:  # both through torch.compile (inductor's C++ code on the CPU): the runtime gap at batch 1
        models["inductor_dense"] = torch.compile(reference, dynamic=False)
        models["inductor_shrunk"] = torch.compile(shrunk, dynamic=False)
    with torch.inference_mode():
        def call(f):  # every model timed through one Python call of the same shape
            return lambda x: f(x)

        calls = {k: {b: call(f) for b, f in m.items()} if isinstance(m, dict) else call(m) for k, m in models.items()}
        with tempfile.TemporaryDirectory() as tmp:
            onnx_calls, onnx_sizes = onnx_runners({"dense": reference, "shrunk": shrunk}, example[:1], Path(tmp))
            calls.update(onnx_calls)
            seconds = time_side_by_side(calls, {1: data.x_test[:1].contiguous(), 64: data.x_test[:64].contiguous()})
    speed = {}
    for batch, t in seconds.items():
        speed[str(batch)] = {"ms": {k: 1e3 * v for k, v in t.items()},
                             "speedup_shrunk": t["dense"] / t["shrunk"],
                             "speedup_shrunk_compiled_auto": t["dense"] / t["shrunk_compiled_auto"],
                             "speedup_both_compiled_auto": t["dense_compiled_auto"] / t["shrunk_compiled_auto"],
                             "torchscript_speedup_shrunk": t["torchscript_dense"] / t["torchscript_shrunk"]}
        if "onnx_dense" in t:
            speed[str(batch)]["onnx_speedup_shrunk"] = t["onnx_dense"] / t["onnx_shrunk"]
        if "inductor_dense" in t:
            speed[str(batch)]["inductor_speedup_shrunk"] = t["inductor_dense"] / t["inductor_shrunk"]
            speed[str(batch)]["inductor_shrunk_over_eager_dense"] = t["dense"] / t["inductor_shrunk"]
        log(f"batch {batch}: " + ", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in t.items()))
    macs_dense, macs_shrunk = macs(reference, example[:1]), macs(shrunk, example[:1])
    return {"test_error_percent": 100 * err_shrunk, "thresholded_test_error_percent": 100 * err_sparse,
            "max_output_gap": gap, "units_kept": units_kept(net_name, exported),
            "shrunk_shapes": {n: list(m.weight.shape) for n, m in shrunk.named_modules()
                              if isinstance(m, (nn.Linear, nn.Conv2d))},
            "parameters_dense": params_dense, "parameters_shrunk": params_shrunk,
            "nonzero_parameters_shrunk": nonzero_shrunk, "macs_dense": macs_dense, "macs_shrunk": macs_shrunk,
            "flop_reduction": macs_dense / macs_shrunk, "speed": speed, "onnx_bytes": onnx_sizes,
            "compression_per_weight": bs.report(exported).compression}


def torchscript_frozen(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` traced, frozen and passed through ``torch.jit.optimize_for_inference`` (oneDNN convolutions with
    their weights prepacked once, fused ReLUs): a deployment runtime inside torch, applied alike to both models.
    TorchScript is deprecated in torch 2.x but still ships; its warnings are silenced here. The result is checked
    against the eager model on ``example``."""
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        scripted = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model.eval(), example)))
        torch.testing.assert_close(scripted(example), model(example), rtol=1e-4, atol=1e-5)
    return scripted


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of ``x[:1]`` through the Linear and Conv layers (every weight counted)."""
    return bench_metrics.macs(model, x)["dense"]


def implied_macs(net_name: str, units: list[int]) -> int:
    """Multiply-accumulates per image implied by the units kept, counted as the anchors count units, so that
    every run and every anchor is priced alike: LeNet-5 ``[c1, c2, fc1 inputs, fc2 inputs]`` (24x24 and 8x8
    convolution outputs, 5x5 kernels), LeNet-300-100 the inputs of its three layers."""
    if net_name == "lenet5":
        c1, c2, f1, f2 = units
        return c1 * 25 * 24 * 24 + c2 * c1 * 25 * 8 * 8 + f1 * f2 + f2 * 10
    i, h1, h2 = units
    return i * h1 + h1 * h2 + h2 * 10


RUN_MARKERS = ["s", "^", "D", "v", "P", "X"]


def plot() -> None:
    """``results/structured.png``: units kept per layer (top) and test error against the multiply-accumulates
    the units imply (bottom, anchors as stars), for LeNet-5 and LeNet-300-100."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(RESULTS.glob("structured_*.json"))
    files = [f for f in files if not f.name.endswith(("_model.json", "_remeasured.json"))]  # one line per run
    if not files:
        print("no results to plot")
        return
    runs = [(f, json.loads(f.read_text())) for f in files]
    fig, axes = plt.subplots(2, 2, figsize=(15, 9))
    for col, net_name in enumerate(["lenet5", "lenet300"]):
        top, bottom = axes[0, col], axes[1, col]
        labels = [f"L{i + 1}" for i in range(len(LAYERS[net_name]))]
        for name, (units, err) in ANCHORS[net_name].items():
            line, = top.plot(labels, units, "o--", alpha=0.5, label=f"{name} ({err}%)")
            at = (implied_macs(net_name, units), err)
            bottom.plot(*at, "*", markersize=14, color=line.get_color(), alpha=0.7)
            bottom.annotate(name, at, fontsize=7, xytext=(5, 3), textcoords="offset points")
        mine = [(f, r) for f, r in runs if r["net"] == net_name]
        for i, (f, r) in enumerate(mine):  # a colour and marker pair of its own for each run (unique below 60)
            style = dict(color=plt.cm.tab20(i % 20), marker=RUN_MARKERS[i % len(RUN_MARKERS)])
            name = f.stem.removeprefix(f"structured_{net_name}_")
            top.plot(labels, r["units_kept"], "-", linewidth=1.5, label=f"{name} ({r['test_error_percent']:.2f}%)",
                     **style)
            bottom.plot(implied_macs(net_name, r["units_kept"]), r["test_error_percent"], linestyle="none",
                        markersize=7, **style)
        top.set_yscale("log")
        top.set_title(f"{net_name}: units kept per layer (lower is smaller)")
        top.set_ylabel("units kept")
        top.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        bottom.set_xscale("log")
        bottom.set_xlabel("multiply-accumulates per image implied by the units kept (log)")
        bottom.set_ylabel("test error %")
        bottom.set_title(f"{net_name}: error against size (bayes_sparse runs: colour and marker as above; "
                         "stars: anchors)", fontsize=9)
        bottom.grid(alpha=0.3)
    fig.tight_layout()
    out = RESULTS / "structured.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def resnet18_mnist() -> nn.Module:
    """torchvision's ResNet-18 adapted to 1x28x28 digits as in ``examples/finetune_torchvision.py``."""
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def _fit(net: nn.Module, groups: list[dict], x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int,
         n: int, log: Callable[[str], None], what: str) -> None:
    opt = torch.optim.Adam(groups)
    for epoch in range(epochs):
        bs.on_epoch_start(net, epoch, epochs)
        net.train()
        perm = torch.randperm(x.shape[0])
        total = 0.0
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx]) + bs.regularizer(net) / n
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bs.after_step(net, groups[0]["lr"], n)
            total += float(loss.detach()) * len(idx)
        log(f"{what} epoch {epoch + 1}/{epochs}: loss {total / x.shape[0]:.4f}")


def resnet18_experiment(args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    """ResNet-18 on MNIST: dense training, BatchNorm folded into the convolutions, group L0 fine-tuning,
    channels removed.

    A channel's gate must silence its output for the channel to go; behind a BatchNorm a silenced convolution
    still outputs the BatchNorm's shift, so the BatchNorms (eval statistics) are folded into the convolutions
    first (``torch.fx.experimental.optimization.fuse``) and each convolution's output channel is gated with
    its bias. Channels tied by a residual addition go only together (``export.shrink``).
    """
    from torch.fx.experimental.optimization import fuse

    torch.manual_seed(args.seed)
    data = bs.data.load_mnist()
    x_train = data.x_train[:args.train_subset].view(-1, 1, 28, 28)
    y_train = data.y_train[:args.train_subset]
    x_test, y_test = data.x_test.view(-1, 1, 28, 28), data.y_test
    n = x_train.shape[0]
    dense = resnet18_mnist()
    start = time.perf_counter()
    _fit(dense, [{"params": list(dense.parameters()), "lr": 1e-3}], x_train, y_train, args.pretrain_epochs,
         args.batch_size, n, log, "dense")
    dense.eval()
    err_dense = bs.error_rate(dense, x_test, y_test)
    folded = fuse(dense)
    err_folded = bs.error_rate(folded, x_test, y_test)
    log(f"dense ResNet-18: test error {100 * err_dense:.2f}% (BatchNorm folded: {100 * err_folded:.2f}%)")
    net = bs.sparsify(folded, "group_l0", exclude=["conv1", "fc"], unit="out", penalty=args.penalty,
                      droprate_init=0.1, warmup=(0.0, 0.0))
    gates = [p for name, p in net.named_parameters() if name.endswith("log_alpha")]
    weights = [p for name, p in net.named_parameters() if not name.endswith("log_alpha")]
    _fit(net, [{"params": weights, "lr": 1e-4}, {"params": gates, "lr": args.gate_lr}], x_train, y_train, args.epochs,
         args.batch_size, n, log, "group L0")
    seconds = time.perf_counter() - start
    bs.threshold_(net)
    net.eval()
    err_sparse = bs.error_rate(net, x_test, y_test)
    exported = bs.to_dense(net).eval()
    example = x_test[:8]
    shrunk = bs.export.shrink(exported, example)
    err_shrunk = bs.error_rate(shrunk, x_test, y_test)
    summary = shrunk.shrink_summary
    params_dense = sum(p.numel() for p in dense.parameters())
    params_shrunk = sum(p.numel() for p in shrunk.parameters())
    log(f"thresholded: {100 * err_sparse:.2f}%, shrunk: {100 * err_shrunk:.2f}%, parameters {params_dense} -> "
        f"{params_shrunk}")
    torch.set_num_threads(1)
    with torch.inference_mode():
        seconds_by = time_side_by_side({"dense": lambda x: dense(x), "dense_bn_folded": lambda x: folded(x),
                                        "shrunk": lambda x: shrunk(x)},
                                       {1: x_test[:1].contiguous(), 64: x_test[:64].contiguous()}, rounds=7)
    speed = {str(b): {"ms": {k: 1e3 * v for k, v in t.items()}, "speedup_shrunk": t["dense"] / t["shrunk"],
                      "speedup_shrunk_over_folded": t["dense_bn_folded"] / t["shrunk"]}
             for b, t in seconds_by.items()}
    for b, t in seconds_by.items():
        log(f"batch {b}: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in t.items()))
    return {"net": "resnet18_mnist", "method": "group_l0", "train_subset": n, "pretrain_epochs": args.pretrain_epochs,
            "epochs": args.epochs, "penalty": args.penalty, "gate_lr": args.gate_lr, "seed": args.seed, "train_seconds": seconds,
            "test_error_percent_dense": 100 * err_dense, "test_error_percent_bn_folded": 100 * err_folded,
            "test_error_percent_thresholded": 100 * err_sparse, "test_error_percent": 100 * err_shrunk,
            "channels": {k: list(v) for k, v in summary.units.items()},
            "parameters_dense": params_dense, "parameters_shrunk": params_shrunk,
            "macs_dense": macs(dense, example[:1]), "macs_shrunk": macs(shrunk, example[:1]), "speed": speed,
            "torch": torch.__version__, "command": "python " + " ".join(sys.argv)}


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=sorted(LAYERS) + ["resnet18"], default="lenet5")
    p.add_argument("--method", choices=["group_l0", "group_vd"], default="group_l0")
    p.add_argument("--recipe", default="sep", help="group_l0 per-layer penalties: sep (L0-sep), sep1.5x / sep2x / sep3x (L0-sep, convolutions x1.5 / x2 / x3) or paper (0.1/N); LeNet-300-100: paper, paper3x")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--from-checkpoint", type=Path, default=None, help="skip training: evaluate this checkpoint")
    p.add_argument("--plot", action="store_true", help="only draw benchmarks/results/structured.png")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--max-units", type=lambda v: [int(t) for t in v.split(",")], default=None, metavar="A,B,C,D",
                   help="after thresholding, keep at most these units per gated layer (largest log alpha first), "
                        "e.g. L0-sep's 9,18,65,25; then --finetune-epochs")
    p.add_argument("--inductor", action="store_true",
                   help="also time the dense and the shrunk model under torch.compile (inductor), side by side")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="group_l0: gated L2 strength on every layer, units of 1/N (the L0 code's 5e-4 per example "
                        "is 30 on MNIST); part of the output name when set")
    p.add_argument("--per-weight", action="store_true", help="group_vd: Sparse VD per weight as well")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="after thresholding: epochs of fine-tuning with the structure fixed (see finetune())")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="fine-tuning Adam learning rate (decays to 0)")
    p.add_argument("--train-subset", type=int, default=10_000, help="resnet18: training images used")
    p.add_argument("--pretrain-epochs", type=int, default=1, help="resnet18: dense epochs before the gates")
    p.add_argument("--gate-lr", type=float, default=0.05,
                   help="resnet18: Adam learning rate of the gates (a gate starting at drop rate 0.1 must move its "
                        "log alpha by about 4.6 to close)")
    p.add_argument("--penalty", type=float, default=3e-4,
                   help="resnet18: group L0 penalty per weight of a channel, units of 1/N (11M weights: ~3 nats/example at the start)")
    args = p.parse_args(argv)
    if args.plot:
        plot()
        return None
    torch.set_num_threads(args.threads)
    log = (lambda s: print(s, flush=True))
    if args.net == "resnet18":
        out = args.out or RESULTS / "structured_resnet18_group_l0.json"
        result = resnet18_experiment(args, log)
        out.write_text(json.dumps(result, indent=2))
        log(f"wrote {out}")
        return result
    recipe = args.recipe if args.method == "group_l0" else ("vd+per_weight" if args.per_weight else "vd")
    if args.method == "group_l0" and (args.net, args.method, recipe) not in PENALTIES:
        p.error(f"no recipe {recipe!r} for {args.net}; choose one of "
                f"{sorted(r for n, m, r in PENALTIES if n == args.net and m == args.method)}")
    if args.weight_decay and args.method != "group_l0":
        p.error("--weight-decay is group_l0's gated L2; group_vd has no such option")
    suffix = "_per_weight" if args.method == "group_vd" and args.per_weight else ""
    if args.weight_decay:
        suffix += f"_wd{args.weight_decay:g}"
    out = args.out or RESULTS / f"structured_{args.net}_{args.method}{suffix}.json"
    if args.from_checkpoint and args.out is None:  # a re-measure never overwrites the training's own result
        out = args.from_checkpoint.with_name(args.from_checkpoint.name.replace("_model.safetensors", "")
                                             + "_remeasured.json")
    ckpt = out.with_name(out.stem + "_model.safetensors")
    data = bs.data.load_mnist()
    net = build(args.net, args.method, recipe, warmup=(0.025, 0.1), per_weight=args.per_weight,
                weight_decay=args.weight_decay)
    curve, seconds = [], 0.0
    if args.from_checkpoint:
        bs.export.load_checkpoint(net, args.from_checkpoint)
    else:
        start = time.perf_counter()
        curve = train(args.net, net, data, args.epochs, args.lr, args.batch_size, args.seed, log)
        seconds = time.perf_counter() - start
        bs.threshold_(net)
        pre = ckpt if args.finetune_epochs == 0 else out.with_name(out.stem + "_before_finetune_model.safetensors")
        bs.export.save_checkpoint(net, pre)
        log(f"wrote {pre}")
    capped = None
    if args.max_units:
        before = units_kept(args.net, net)
        capped = {"units_before": before, "caps": args.max_units,
                  "units_after": cap_units_(args.net, net, args.max_units)}
        log(f"units capped at {args.max_units}: {before} -> {capped['units_after']}")
    ft_curve, ft_from = [], None
    if args.finetune_epochs > 0:
        ft_from = {"test_error_percent": 100 * bs.error_rate(net.eval(), data.x_test, data.y_test),
                   "units_kept": units_kept(args.net, net)}
        log(f"before fine-tuning: {ft_from}")
        ft_curve = finetune(args.net, net, data, args.finetune_epochs, args.finetune_lr, args.batch_size, args.seed,
                            log)
        bs.export.save_checkpoint(net, ckpt)
        log(f"wrote {ckpt}")
    result = {"net": args.net, "method": args.method, "recipe": recipe, "epochs": args.epochs, "lr": args.lr,
              "finetune_epochs": args.finetune_epochs, "finetune_lr": args.finetune_lr,
              "before_finetune": ft_from, "finetune_curve": ft_curve,
              "batch_size": args.batch_size, "seed": args.seed, "weight_decay": args.weight_decay, "train_seconds": seconds,
              "from_checkpoint": str(args.from_checkpoint) if args.from_checkpoint else None,
              "max_units": capped,
              "anchors": {k: {"units": u, "error_percent": e} for k, (u, e) in ANCHORS[args.net].items()}}
    result.update(evaluate(args.net, net, data, log, inductor=args.inductor))
    result.update({"curve": curve, "torch": torch.__version__, "python": platform.python_version(),
                   "command": "python " + " ".join(sys.argv)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")
    plot()
    return result


if __name__ == "__main__":
    main()
