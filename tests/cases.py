"""Shared test material: the table of layer cases (id, dense class, sparse class name, constructor kwargs, input
shape) and a small two-class toy task with its MLP and a plain training loop."""

import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs

LAYER_CASES = [
    ("linear", nn.Linear, "Linear", dict(in_features=7, out_features=5), (4, 7)),
    ("linear-nobias", nn.Linear, "Linear", dict(in_features=7, out_features=5, bias=False), (2, 3, 7)),
    ("conv1d", nn.Conv1d, "Conv1d", dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1), (2, 4, 11)),
    ("conv2d-geometry", nn.Conv2d, "Conv2d",
     dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2, dilation=2, groups=2), (2, 4, 9, 9)),
    ("conv2d-reflect", nn.Conv2d, "Conv2d",
     dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"), (2, 3, 7, 7)),
    ("conv2d-depthwise-circular", nn.Conv2d, "Conv2d",
     dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, padding_mode="circular"), (1, 4, 6, 6)),
    ("conv3d", nn.Conv3d, "Conv3d", dict(in_channels=2, out_channels=3, kernel_size=2, stride=(1, 2, 1)), (1, 2, 4, 5, 4)),
]
CASE_IDS = [c[0] for c in LAYER_CASES]


#: Examples of the toy task (also the ``num_data`` the regularizer is divided by).
TOY_N = 256


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    """256 examples of 10 Gaussian features; the label is whether the first two sum above 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOY_N, 10, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def toy_mlp() -> nn.Sequential:
    """A 10-32-16-2 ReLU MLP, the same weights on every call."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2))


def train_toy(net: nn.Module, steps: int, lr: float = 0.05, reg_scale: float = 1.0) -> nn.Module:
    """Adam on minibatches of 64 with loss ``CE + reg_scale * regularizer / TOY_N``; returns ``net`` in eval mode."""
    x, y = toy_data()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for i in range(steps):
        xb, yb = x[(i % 4) * 64:(i % 4 + 1) * 64], y[(i % 4) * 64:(i % 4 + 1) * 64]
        loss = F.cross_entropy(net(xb), yb) + reg_scale * bs.regularizer(net) / TOY_N
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
