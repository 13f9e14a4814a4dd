"""Share of weight parameters a method controls after ``sparsify`` on full-size real models.

    python benchmarks/coverage.py            # writes benchmarks/results/coverage.json

Models: torchvision vit_b_16 and swin_t, ``nn.TransformerEncoder`` (d=512, 6 layers), an LSTM language model
with tied embeddings, a tiny GPT-2 (``transformers``, when installed), and the convolutional networks
resnet18, mobilenet_v2, efficientnet_b0, densenet121. For each: weight elements (parameters with 2+
dimensions, shared ones once), elements under the method, the coverage, and what was left dense.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import bayes_sparse as bs

RESULTS = Path(__file__).parent / "results"


class LSTMLM(nn.Module):
    def __init__(self, vocab: int = 10000, dim: int = 650) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


def models() -> dict:
    from torchvision import models as tvm

    out = {
        "vit_b_16": tvm.vit_b_16, "swin_t": tvm.swin_t,
        "transformer_encoder": lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True), 6,
                                                             enable_nested_tensor=False),
        "lstm_lm_tied": LSTMLM, "resnet18": tvm.resnet18, "mobilenet_v2": tvm.mobilenet_v2,
        "efficientnet_b0": tvm.efficientnet_b0, "densenet121": tvm.densenet121,
    }
    try:
        import transformers

        out["gpt2_tiny"] = lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64))
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="vd", choices=bs.methods())
    p.add_argument("--out", type=Path, default=RESULTS / "coverage.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = {}
    for name, make in models().items():
        start = time.perf_counter()
        net = bs.sparsify(make(), method=args.method, inplace=True)
        rep = bs.conversion_report(net)
        rows[name] = {"weights": rep.weights, "controlled": rep.controlled, "coverage": rep.coverage,
                      "converted": len(rep.converted), "left_dense": [list(r) for r in rep.kept],
                      "seconds": time.perf_counter() - start}
        print(f"{name:22s} {100 * rep.coverage:6.2f}% of {rep.weights:>12,} weight elements", flush=True)
        del net
    result = {"method": args.method, "models": rows, "torch": torch.__version__, "python": platform.python_version(),
              "command": "python " + " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
