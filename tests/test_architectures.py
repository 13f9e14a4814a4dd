"""Real architectures, every method: conversion, both training paths, thresholding and every export route.

The real torchvision networks (resnet18, mobilenet_v2 at width 0.25, efficientnet_b0, mnasnet0_5,
shufflenet_v2, swin_t) and a small VisionTransformer; ``nn.TransformerEncoder``; LSTM/GRU models; a weight-tied language model; a
module calling ``F.linear`` on its own parameter; a GPT-2-style ``Conv1D``), small inputs. For each:
outputs equal after conversion in eval, with and without ``no_grad`` (fused attention paths read
``.weight``); one plain-loop step and one SVI step train; after ``threshold_`` the sparse model, its dense
export loaded into a fresh instance of the original class, the saved file, the compiled model and ONNX
all agree.
"""

from __future__ import annotations

import warnings
from functools import partial

import pyro
import pyro.infer
import pyro.optim
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs

tv = pytest.importorskip("torchvision")
from torchvision.models import (  # noqa: E402
    efficientnet_b0, mnasnet0_5, mobilenet_v2, resnet18, shufflenet_v2_x0_5, swin_t)
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402

METHODS = ["vd", "l0", "ltp", "l1", "magnitude"]


class TiedLM(nn.Module):
    """Embedding and output layer share one weight; an LSTM between."""

    def __init__(self, vocab: int = 40, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.rnn(self.emb(x))[0])


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 12, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        return self.fc(self.gru(x)[0][:, -1])


class RawParam(nn.Module):
    """A model that calls ``F.linear`` on its own parameters, plus a transposed convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2)
        self.w = nn.Parameter(torch.randn(10, 3 * 9 * 9) * 0.05)
        self.b = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return F.linear(torch.relu(self.up(x)).flatten(1), self.w, self.b)


class Conv1D(nn.Module):
    """Hugging Face GPT-2's ``Conv1D`` (weight stored transposed, used through ``torch.addmm``)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.05)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).reshape(*x.shape[:-1], self.nf)


class GPTBlockLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(30, 16)
        self.c_attn, self.c_proj = Conv1D(48, 16), Conv1D(16, 16)
        self.lm_head = nn.Linear(16, 30, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, x):
        h = self.wte(x)
        q, k, v = self.c_attn(h).split(16, dim=-1)
        att = (q @ k.transpose(-1, -2) / 4.0).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
        h = h + self.c_proj(att.softmax(-1) @ v)
        return self.lm_head(h)


def _encoder():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(80, 3))


def _image(channels=3, size=32, batch=4):
    return lambda: torch.randn(batch, channels, size, size)


# (id, constructor, example input, kind of target, onnx)
ARCHS = [
    ("resnet18", partial(resnet18, num_classes=5), _image(), "class", True),
    ("mobilenet_v2", partial(mobilenet_v2, num_classes=5, width_mult=0.25), _image(), "class", True),
    ("efficientnet_b0", partial(efficientnet_b0, num_classes=5), _image(), "class", True),
    ("mnasnet0_5", partial(mnasnet0_5, num_classes=5), _image(), "class", True),
    ("shufflenet_v2", partial(shufflenet_v2_x0_5, num_classes=5), _image(), "class", True),
    ("swin_t", partial(swin_t, num_classes=5), _image(size=64, batch=2), "class", True),
    ("vit", partial(VisionTransformer, image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                    mlp_dim=32, num_classes=5), _image(), "class", True),
    ("transformer_encoder", _encoder, lambda: torch.randn(2, 5, 16), "class", True),
    ("lstm_tied_lm", TiedLM, lambda: torch.randint(0, 40, (2, 7)), "lm", True),
    ("gru", GRUClassifier, lambda: torch.randn(2, 5, 6), "class", True),
    ("raw_param", RawParam, _image(2, 4), "class", True),
    ("gpt_like_conv1d", GPTBlockLike, lambda: torch.randint(0, 30, (2, 6)), "lm", True),
]
ARCH_IDS = [a[0] for a in ARCHS]


def _loss(out, x, kind):
    if kind == "lm":
        return F.cross_entropy(out.flatten(0, 1), x.flatten())
    return F.cross_entropy(out, torch.arange(out.shape[0]) % out.shape[-1])


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_every_route_agrees(arch, method, tmp_path):
    name, make, example, kind, onnx_ok = arch
    torch.manual_seed(0)
    original = make().eval()
    x = example()
    with torch.no_grad():
        expected = original(x)

    net = bs.sparsify(original, method=method).eval()
    report = bs.conversion_report(net)
    assert report.coverage >= 0.95, str(report)
    with torch.no_grad():
        _close(net(x), expected, "converted, no_grad")
    _close(net(x).detach(), expected, "converted, grad enabled")

    # one plain-loop step and one SVI step
    net.train()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    bs.on_epoch_start(net, 0, 1)
    loss = _loss(net(x), x, kind) + bs.regularizer(net) / 100
    loss.backward()
    opt.step()
    bs.after_step(net, 1e-3, 100)
    moved = [n for n, p in net.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved, "no parameter moved in the plain loop"
    if kind == "class":
        model = bs.SVIModel(net, num_data=100)
        svi = pyro.infer.SVI(model, model.guide, pyro.optim.Adam({"lr": 1e-4}), pyro.infer.Trace_ELBO())
        assert torch.isfinite(torch.tensor(svi.step(x, torch.arange(x.shape[0]) % 5)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bs.threshold_(net, sparsity=0.5)
    net.eval()
    with torch.no_grad():
        thresholded = net(x)
    _close(net(x).detach(), thresholded, "thresholded, grad enabled vs no_grad")

    fresh = make().eval()
    fresh.load_state_dict(bs.to_dense(net).state_dict())
    with torch.no_grad():
        _close(fresh(x), thresholded, "dense export in a fresh instance")
        loaded = bs.export.load(bs.export.save(net, tmp_path / "m.safetensors").path, model=make())
        _close(loaded(x), thresholded, "saved file")
        compiled = bs.export.compile(net, kernel="dense")
        _close(compiled(x), thresholded, "export.compile")
    if onnx_ok and method == "magnitude":  # the exported graph is the same for every method
        ort = pytest.importorskip("onnxruntime")
        path = bs.export.to_onnx(net, x, tmp_path / "m.onnx")
        session = ort.InferenceSession(str(path))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        _close(torch.from_numpy(got), thresholded, "onnx")


@pytest.mark.parametrize("method", ["vd", "l0", "magnitude"])
def test_tiny_gpt2_from_transformers(method):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    original = transformers.GPT2LMHeadModel(cfg).eval()
    x = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        expected = original(x).logits
    net = bs.sparsify(original, method=method).eval()
    report = bs.conversion_report(net)
    assert report.coverage >= 0.95, str(report)
    assert {"transformer.h.0.attn.c_attn.weight", "lm_head.weight", "transformer.wte.weight"} <= {
        r[0] for r in report.converted}
    with torch.no_grad():
        _close(net(x).logits, expected, "converted")
    net.train()
    (net(x, labels=x).loss + bs.regularizer(net) / 100).backward()
    assert net.lm_head.sparse_params["weight"] is net.transformer.wte.sparse_params["weight"]  # one holder
    bs.threshold_(net, sparsity=0.5)
    net.eval()
    with torch.no_grad():
        thresholded = net(x).logits
    dense = bs.to_dense(net)
    assert dense.lm_head.weight is dense.transformer.wte.weight  # re-tied
    fresh = transformers.GPT2LMHeadModel(cfg).eval()
    fresh.load_state_dict(dense.state_dict())
    with torch.no_grad():
        _close(fresh(x).logits, thresholded, "dense export")


def test_a_tie_half_converted_is_refused():
    with pytest.raises(ValueError, match=r"head.weight is the same parameter as emb.weight, which is not being "
                                         r"converted: sparsifying one would untie them"):
        bs.sparsify(TiedLM(), exclude=["emb"])
