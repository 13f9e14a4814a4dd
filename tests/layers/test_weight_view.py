"""``layer.weight`` as every reader sees it: masked in eval, the method's stochastic weight in training."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs

METHODS = ["vd", "l0", "ltp", "l1", "magnitude"]


@pytest.mark.parametrize("method", METHODS)
def test_eval_weight_is_the_exported_weight(method):
    dense = nn.Linear(20, 10)
    layer = bs.sparsify(nn.Sequential(dense), method=method)[0].eval()
    torch.testing.assert_close(layer.weight, dense.weight)  # right after conversion (L0 stores weight / gate)
    bs.threshold_(layer, sparsity=0.6)
    exported = bs.to_dense(layer)
    assert torch.equal(layer.weight, exported.weight)
    assert int((layer.weight != 0).sum()) == 80
    x = torch.randn(3, 20)
    torch.testing.assert_close(F.linear(x, layer.weight, layer.bias), layer(x))


@pytest.mark.parametrize("method", ["vd", "l0"])
def test_training_weight_is_a_draw_that_trains_the_method(method):
    class ReadsChildWeight(nn.Module):  # like swin's attention: the parent uses child.weight, never child(x)
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 4)

        def forward(self, x):
            return F.linear(x, self.proj.weight, self.proj.bias)

    net = bs.sparsify(ReadsChildWeight(), method=method).train()
    layer = net.proj
    if method == "vd":
        with torch.no_grad():
            layer.log_sigma2.fill_(-2.0)
    assert not torch.equal(layer.weight, layer.weight)  # noise / sampled gates in training
    x = torch.randn(16, 8)
    F.mse_loss(net(x), torch.zeros(16, 4)).backward()  # the data term alone, no regularizer
    method_param = layer.log_sigma2 if method == "vd" else layer.log_alpha
    assert method_param.grad is not None and method_param.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["l1", "magnitude"])
def test_unmasked_training_weight_is_the_parameter_itself(method):
    layer = bs.sparsify(nn.Sequential(nn.Linear(5, 3)), method=method)[0].train()
    assert layer.weight is layer.raw_weight  # so nn.init and in-place edits reach the parameter
    bs.threshold_(layer, sparsity=0.5)
    assert layer.weight is not layer.raw_weight and int((layer.weight != 0).sum()) <= 8


@pytest.mark.parametrize("method", METHODS)
def test_multihead_attention_fast_path_sees_the_masks(method):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    net = bs.sparsify(mha, method=method)
    assert type(net.out_proj).__name__.endswith("Linear") and "in_proj_weight" in net.sparse_params
    bs.threshold_(net, sparsity=0.7)
    net.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():  # PyTorch's fused fast path: reads in_proj_weight and out_proj.weight directly
        fast = net(x, x, x, need_weights=False)[0]
    slow = net(x, x, x, need_weights=False)[0].detach()
    dense = bs.to_dense(net)
    with torch.no_grad():
        exported = dense(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, exported, rtol=1e-5, atol=1e-5)
    assert type(dense) is nn.MultiheadAttention and int((dense.in_proj_weight == 0).sum()) >= int(0.7 * 768)


def test_held_parameters_refuse_assignment_and_report_coverage():
    net = bs.sparsify(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2)), method="vd")
    with pytest.raises(AttributeError, match=r"Embedding.weight is sparsified \(held in .sparse_params\['weight'\]\)"):
        net[0].weight = torch.zeros(10, 4)
    rep = bs.conversion_report(net)
    assert rep.coverage == 1.0 and ("0.weight", "Embedding", "VDParameterHolder") in rep.converted
