"""Sparse layers under torch.compile and autocast: no graph breaks, fullgraph train/eval steps, bfloat16."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs
from bayes_sparse import _fusedkernel

METHODS = ["vd", "l0", "ltp", "l1", "magnitude"]
N = 500


def _dense():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _net(method, fixed):
    net = bs.sparsify(_dense(), method=method)
    if fixed:
        bs.threshold_(net, sparsity=0.5)
    return net


@pytest.mark.parametrize("fixed", [False, True], ids=["criterion", "fixed-mask"])
@pytest.mark.parametrize("method", METHODS)
def test_no_graph_breaks_in_train_or_eval(method, fixed):
    net = _net(method, fixed)
    x = torch.randn(2, 1, 8, 8)
    for training in (True, False):
        net.train(training)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(net)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


@pytest.mark.parametrize("method", METHODS)
def test_fullgraph_compiled_steps_match_eager(method):
    torch._dynamo.reset()
    net = _net(method, fixed=False)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))

    def loss_fn(inp, target):
        return F.cross_entropy(net(inp), target) + bs.regularizer(net) / N

    compiled_loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    compiled_net = torch.compile(net, fullgraph=True, backend="aot_eager")
    net.train()
    torch.manual_seed(3)
    with _fusedkernel.disabled():  # eager L0 on the CPU draws its noise in C++; compiled graphs use rand_like
        eager = loss_fn(x, y)
    eager.backward()
    eager_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    torch.manual_seed(3)
    compiled = compiled_loss(x, y)
    compiled.backward()
    # the same random noise is drawn in the same order, so training steps agree too
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for g, p in zip(eager_grads, net.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    bs.threshold_(net)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled_net(x), net(x))


@pytest.mark.parametrize("method", METHODS)
def test_autocast_bfloat16_eval_matches_torch_layers(method):
    dense = _dense().eval()
    net = bs.sparsify(dense, method=method).eval()
    x = torch.randn(4, 1, 8, 8)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = dense(xs[0])
        out = net(xs[1])
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    ref.float().square().sum().backward()
    out.float().square().sum().backward()
    scale = float(xs[0].grad.abs().max())
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=5e-2, atol=5e-2 * scale)
    params = dict(net.named_parameters())  # the stored parameters (``weight`` is the masked view)
    for name in ("0.bias", "3.bias"):
        torch.testing.assert_close(params[name].grad, dense.get_parameter(name).grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("method", METHODS)
def test_autocast_bfloat16_training_step_matches_float32(method):
    """Training mode (noise, gates, soft masks) under autocast equals the float32 step to bf16 tolerance."""
    net = bs.sparsify(_dense(), method=method).train()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    grads = []
    for autocast in (False, True):
        net.zero_grad()
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(x)
            loss = F.cross_entropy(out.float(), y) + bs.regularizer(net) / N
        loss.backward()
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        grads.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
    (l32, g32), (l16, g16) = grads
    torch.testing.assert_close(l16, l32, rtol=3e-2, atol=3e-2)
    for a, b in zip(g16, g32):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.1 * float(b.abs().max()) + 1e-6)


def test_wrong_dtype_without_autocast_is_a_clear_error():
    layer = bs.VDLinear(4, 2)
    with pytest.raises(TypeError, match=r"got input of dtype torch.float64 but its weights are torch.float32"):
        layer(torch.randn(3, 4, dtype=torch.float64))
