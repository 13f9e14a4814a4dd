"""NaN/inf in a batch, the loss or the gradients stops training before the optimizer step, and nothing is lost."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_sparse as bs
from bayes_sparse.infer import check_finite_

N, B = 40, 10


class _PoisonGrad(torch.autograd.Function):
    """Identity whose backward pass returns NaN (the gradient of everything before it goes NaN)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _PoisonAt(nn.Module):
    """Identity; on its ``at``-th call its backward pass turns the gradient NaN (the loss stays finite)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x):
        self.calls += 1
        return _PoisonGrad.apply(x) if self.calls - 1 == self.at else x


def _net(poison_at=None):
    return nn.Sequential(bs.VDLinear(3, 4), _PoisonAt(poison_at), nn.ReLU(), bs.VDLinear(4, 2))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 3, generator=g), torch.randint(0, 2, (N,), generator=g)


def _batches(x, y):
    return lambda: [(x[i:i + B], y[i:i + B]) for i in range(0, N, B)]


def _fit_recording(model, batches, epochs=1):
    """fit_svi, keeping a copy of the state after every step; returns (error, copies)."""
    copies = []
    with pytest.raises(FloatingPointError) as info:
        bs.fit_svi(model, batches, epochs=epochs, lr=0.05, progress=False,
                   on_step_end=lambda lr: copies.append(copy.deepcopy(model.state_dict())))
    return info.value, copies


def _assert_state_equal(model, state):
    for (name, value), expected in zip(model.state_dict().items(), state.values()):
        assert torch.equal(value, expected) if isinstance(value, torch.Tensor) else value == expected, name


def test_fit_svi_nan_in_a_batch_keeps_the_last_good_parameters():
    x, y = _data()
    x[27, 1] = float("nan")  # step 2 of each epoch (examples 20-29), example 7 of that batch
    model = bs.SVIModel(_net(), num_data=N)
    error, copies = _fit_recording(model, _batches(x, y))
    assert len(copies) == 2  # steps 0 and 1 ran
    assert str(error).startswith("the minibatch at epoch 0, step 2 holds NaN/inf: x has 1 non-finite entries "
                                 "(example 7); check the data for NaN/inf")
    assert "the parameters keep their values from the last good step" in str(error)
    _assert_state_equal(model, copies[-1])  # exactly the parameters after step 1
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_fit_svi_names_the_epoch_and_a_non_finite_target():
    x, y = _data()
    model = bs.SVIModel(nn.Sequential(bs.VDLinear(3, 1)), num_data=N, likelihood="gaussian")
    targets = torch.randn(N, 1)
    epochs_done = []

    def batches():  # the second epoch's third batch holds inf in y
        t = targets.clone()
        if epochs_done:
            t[25] = float("inf")
        epochs_done.append(1)
        return [(x[i:i + B], t[i:i + B]) for i in range(0, N, B)]

    error, copies = _fit_recording(model, batches, epochs=2)
    assert len(copies) == 6
    assert str(error).startswith("the minibatch at epoch 1, step 2 holds NaN/inf: y has 1 non-finite entries")
    _assert_state_equal(model, copies[-1])


def test_fit_svi_nan_gradient_names_the_layer_and_takes_no_step():
    x, y = _data()
    torch.manual_seed(1)
    model = bs.SVIModel(_net(poison_at=3), num_data=N)
    error, copies = _fit_recording(model, _batches(x, y))
    assert len(copies) == 3
    message = str(error)
    assert message.startswith("training became non-finite at epoch 0, step 3 (the loss is ")
    # the NaN enters behind the first layer: its parameters' gradients are NaN, the last layer's are not
    assert "First non-finite gradient: 'net.0.weight' of layer 'net.0' (VDLinear), 12 of 12 entries" in message
    assert "Every parameter is still finite. The optimizer did not step" in message
    _assert_state_equal(model, copies[-1])
    # nothing is lost: training goes on from the kept parameters
    model.net[1].at = None
    bs.fit_svi(model, _batches(x, y), epochs=1, lr=0.05, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fit_svi_names_a_parameter_that_went_non_finite_outside_the_optimizer():
    x, y = _data()
    model = bs.SVIModel(_net(), num_data=N)
    steps = []

    def poison_after_step_1(lr):  # e.g. a schedule hook writing NaN
        steps.append(lr)
        if len(steps) == 2:
            with torch.no_grad():
                model.net[3].log_sigma2[0, 1] = float("nan")

    with pytest.raises(FloatingPointError) as info:
        bs.fit_svi(model, _batches(x, y), epochs=1, progress=False, on_step_end=poison_after_step_1)
    message = str(info.value)
    assert message.startswith("the network output became non-finite at epoch 0, step 2")
    assert "First non-finite parameter: 'net.3.log_sigma2' of layer 'net.3' (VDLinear), 1 of 8 values" in message
    assert "restore a checkpoint" in message


def test_fit_svi_output_overflow_and_infinite_loss():
    x, y = _data()
    x[12] = 3e38  # finite input, the first layer's output overflows
    model = bs.SVIModel(_net(), num_data=N)
    error, copies = _fit_recording(model, _batches(x, y))
    assert str(error).startswith("the network output became non-finite at epoch 0, step 1 (Pyro's likelihood "
                                 "refused it); lower the learning rate (lr=0.05)")
    assert "an activation overflowed inside the network" in str(error)
    _assert_state_equal(model, copies[-1])

    reg = bs.SVIModel(nn.Sequential(bs.VDLinear(3, 1)), N, likelihood="gaussian", obs_scale=1.0)
    targets = torch.randn(N, 1)
    targets[35] = 1e30  # (y - mean)^2 overflows float32: an infinite loss with finite gradients
    error, copies = _fit_recording(reg, _batches(x.clamp(-5, 5), targets))
    assert str(error).startswith("the loss became inf at epoch 0, step 3; lower the learning rate (lr=0.05) or "
                                 "check the data for NaN/inf")
    _assert_state_equal(reg, copies[-1])


# ----- the plain loop: check_finite_ between backward() and optimizer.step() --------------------------------


def _plain_loop(net, x, y, copies, epochs=2, lr=1e-2):
    """The documented plain loop with the guard, appending the (state, optimizer state) after each step to copies."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for epoch in range(epochs):
        bs.on_epoch_start(net, epoch, epochs)
        for step in range(N // B):
            xb, yb = x[step * B:(step + 1) * B], y[step * B:(step + 1) * B]
            loss = F.cross_entropy(net(xb), yb) + bs.regularizer(net) / N
            opt.zero_grad()
            loss.backward()
            check_finite_(net, loss, step, epoch=epoch)
            opt.step()
            bs.after_step(net, lr, N)
            copies.append((copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())))


@pytest.mark.parametrize("method", ["vd", "l1", "ltp"])
def test_check_finite_stops_a_plain_loop_before_the_step(method):
    x, y = _data()
    x[31] = float("nan")  # epoch 0, step 3
    net = bs.sparsify(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), method=method)
    copies = []
    with pytest.raises(FloatingPointError) as info:
        _plain_loop(net, x, y, copies)
    assert len(copies) == 3
    _assert_state_equal(net, copies[-1][0])
    message = str(info.value)
    assert message.startswith("the loss became nan at epoch 0, step 3; check the batch for NaN/inf")
    cls = type(net[0]).__name__
    assert f"First non-finite gradient: '0.weight' of layer '0' ({cls})" in message
    assert all(p.grad is None for p in net.parameters())  # cleared: a caught error then opt.step() writes nothing


def test_check_finite_leaves_parameters_and_optimizer_state_at_the_last_good_step():
    x, y = _data()
    net = bs.sparsify(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), method="l1")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    kept = None
    for step in range(N // B):
        xb = x[step * B:(step + 1) * B].clone()
        if step == 2:
            xb[0, 0] = float("inf")
        loss = F.cross_entropy(net(xb), y[step * B:(step + 1) * B]) + bs.regularizer(net) / N
        opt.zero_grad()
        loss.backward()
        try:
            check_finite_(net, loss, step)
        except FloatingPointError as e:
            assert "at step 2;" in str(e)
            opt.step()  # a careless loop steps anyway: the cleared gradients write nothing
            break
        opt.step()
        kept = (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()))
    else:
        pytest.fail("the inf at step 2 was not caught")
    _assert_state_equal(net, kept[0])
    state = opt.state_dict()["state"]
    for i, s in kept[1]["state"].items():
        for k, v in s.items():
            assert torch.equal(state[i][k], v), (i, k)


def test_check_finite_passes_finite_steps_and_checks_parameter_values():
    net = nn.Sequential(bs.VDLinear(3, 2))
    loss = net(torch.randn(4, 3)).sum()
    loss.backward()
    check_finite_(net, loss, 0)
    check_finite_(net)
    assert net[0].raw_weight.grad is not None  # untouched when finite
    net[0].raw_weight.grad.fill_(3e38)  # finite, though their sum overflows: no false alarm
    check_finite_(net, loss, 1)
    with torch.no_grad():
        net[0].bias[1] = float("-inf")
    with pytest.raises(FloatingPointError, match=r"training became non-finite at epoch 4, step 9 \(the loss is 1.5\); "
                                                 r".*First non-finite parameter: '0.bias' of layer '0' \(VDLinear\), "
                                                 r"1 of 2 values \(already non-finite before this step"):
        check_finite_(net, 1.5, 9, epoch=4)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        check_finite_("net")
