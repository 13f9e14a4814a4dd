"""Shared table of layer cases: (id, dense class, sparse class name, constructor kwargs, input shape)."""

from torch import nn

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
