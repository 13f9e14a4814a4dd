"""Independent references shared by the integration tests."""

import torch
from torch import nn

import bayes_sparse as bs


def ltp_penalty_by_hand(model: nn.Module) -> torch.Tensor:
    """The LTP soft-L0 penalty from its definition (not through bs.regularizer)."""
    total = torch.zeros(())
    for m in model.modules():
        if isinstance(m, bs.LTP):
            w = m.raw_weight
            soft = torch.sigmoid((w * w - m.tau) / (m.temperature * m.weight_scale2))
            total = total + m.penalty * m.reg_weight * soft.sum()
    return total
