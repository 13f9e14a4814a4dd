"""PyTorch Lightning integration: loss and gradients against a hand-built objective, schedules, masks, export."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402

import bayes_sparse as bs  # noqa: E402
from tests.integrations._reference import ltp_penalty_by_hand  # noqa: E402
from bayes_sparse.integrations.lightning import SparsifyCallback, add_regularizer  # noqa: E402

# Lightning 2.6 on torch 2.14 warns about a torch pytree deprecation on every fit; not ours
pytestmark = pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec")

N, BATCH, D_IN, N_CLASSES = 256, 32, 8, 3


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU(), nn.Linear(16, N_CLASSES))


def make_loader(n: int = N, batch_size: int = BATCH) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, D_IN, generator=g)
    y = (x[:, :N_CLASSES] * 2).argmax(1)  # only the first features matter: the rest can be pruned
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Lit(pl.LightningModule):
    def __init__(self, net: nn.Module, num_data: int | None, lr: float = 0.05, optimizer: str = "adam",
                 scheduler_gamma: float | None = None) -> None:
        super().__init__()
        self.net, self.num_data, self.lr, self.optimizer, self.gamma = net, num_data, lr, optimizer, scheduler_gamma

    def training_step(self, batch, batch_idx):
        x, y = batch
        nll = F.cross_entropy(self.net(x), y)
        return nll if self.num_data is None else add_regularizer(nll, self.net, self.num_data)

    def configure_optimizers(self):
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD
        opt = cls(self.parameters(), lr=self.lr)
        if self.gamma is None:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_trainer(callbacks, epochs: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs)


class Recorder(pl.Callback):
    """Snapshots the network before each step, its gradients at the step, and the loss Lightning optimized."""

    def __init__(self) -> None:
        self.steps, self.epoch_state = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        net = pl_module.net
        if batch_idx == 0:
            ltp = [m for m in net.modules() if isinstance(m, bs.LTP)]
            self.epoch_state.append((ltp[0].reg_weight, ltp[0].temperature))
        self.steps.append({"before": copy.deepcopy(net), "batch": [t.clone() for t in batch]})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps[-1]["grads"] = {n: p.grad.clone() for n, p in pl_module.net.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["loss"] = float(outputs["loss"])


def test_lightning_trains_regularized_schedules_thresholds_exports():
    epochs = 3
    net = bs.sparsify(make_mlp(), method="ltp", warmup=(0.0, 0.5), penalty=2.0)
    rec, cb = Recorder(), SparsifyCallback(num_data=N)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([cb, rec], epochs).fit(Lit(net, N), make_loader())
    # no warning from the callback: N matches the dataset, and the loss was regularized
    assert not [str(w.message) for w in caught if "regularizer" in str(w.message) or "num_data" in str(w.message)]

    # (1) the loss Lightning optimized, and its gradients, equal mean NLL + penalty / N built by hand
    assert len(rec.steps) == epochs * N // BATCH
    reg_seen = 0.0
    for step in rec.steps:
        ref = step["before"].train()
        x, y = step["batch"]
        reg = ltp_penalty_by_hand(ref) / N
        loss = F.cross_entropy(ref(x), y) + reg
        names, params = zip(*ref.named_parameters())
        grads = torch.autograd.grad(loss, params)
        assert step["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
        for name, g in zip(names, grads):
            torch.testing.assert_close(step["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        reg_seen = max(reg_seen, reg.item())
    assert reg_seen > 0.01  # the penalty was a visible part of the objective

    # (2) the schedules ran each epoch: warm-up ramp over the first half, LTP temperature annealing
    weights = [w for w, _ in rec.epoch_state]
    temps = [t for _, t in rec.epoch_state]
    assert weights == pytest.approx([0.0, 2 / 3, 1.0])
    assert temps == pytest.approx([bs.temperature_schedule(e, epochs, 0.25, 0.0025) for e in range(epochs)])
    assert cb.epochs == epochs

    # (3) masks fixed, something pruned
    layers = [m for _, m in bs.sparse_layers(net)]
    assert layers and all(m.mask_fixed for m in layers)
    assert bs.report(net).compression > 1.0
    assert set(cb.densities) == {"net.0", "net.2"} and min(cb.densities.values()) < 1.0

    # (4) the export loads into the original architecture and computes what the sparse model does
    plain = make_mlp()
    plain.load_state_dict(bs.to_dense(net).state_dict())
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(plain(x), net.eval()(x))


def test_after_step_gets_each_steps_lr_with_accumulation():
    """Proximal L1 runs once per optimizer step, with the lr of that step (before the step scheduler)."""
    net = bs.sparsify(make_mlp(), method="l1", proximal=True, penalty=1.0)
    calls = []
    for name, layer in bs.sparse_layers(net):
        original = layer.after_step
        layer.after_step = lambda lr, n, _o=original, _name=name: (calls.append((_name, lr, n)), _o(lr, n))[1]
    cb = SparsifyCallback(num_data=N, threshold={"sparsity": 0.5})
    make_trainer([cb], 1, accumulate_grad_batches=2).fit(
        Lit(net, N, lr=0.1, optimizer="sgd", scheduler_gamma=0.5), make_loader())
    steps = N // BATCH // 2
    expected = [0.1 * 0.5 ** k for k in range(steps)]
    for name in ("0", "2"):
        got = [(lr, n) for layer, lr, n in calls if layer == name]
        assert [lr for lr, _ in got] == pytest.approx(expected)
        assert {n for _, n in got} == {N}
    assert cb.densities == pytest.approx({"net.0": 0.5, "net.2": 0.5}, abs=0.02)
    assert all(m.mask_fixed for _, m in bs.sparse_layers(net))


def test_threshold_false_leaves_masks_and_keyword_threshold_checked():
    net = bs.sparsify(make_mlp(), method="vd")
    make_trainer([SparsifyCallback(N, threshold=False)], 1, limit_train_batches=2).fit(Lit(net, N), make_loader())
    assert not any(m.mask_fixed for _, m in bs.sparse_layers(net))
    with pytest.raises(TypeError, match="threshold_ does not take"):
        SparsifyCallback(N, threshold={"sparsty": 0.9})
    with pytest.raises(TypeError, match="True .* False .* or a dict"):
        SparsifyCallback(N, threshold=0.9)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "60000", True, None])
def test_num_data_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_data must be a positive int"):
        SparsifyCallback(num_data=bad)
    with pytest.raises(ValueError, match="num_data must be a positive int"):
        add_regularizer(torch.tensor(1.0), bs.sparsify(make_mlp(), method="vd"), bad)


def test_model_without_sparse_layers_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"no sparse layers.*sparsify"):
        make_trainer([SparsifyCallback(N)], 1, limit_train_batches=1).fit(Lit(make_mlp(), None), make_loader())
    with pytest.raises(ValueError, match=r"no sparse layers.*sparsify"):
        add_regularizer(torch.tensor(1.0), make_mlp(), N)


def test_forgotten_regularizer_warns_and_mismatched_n_raises():
    net = bs.sparsify(make_mlp(), method="vd")
    with pytest.warns(UserWarning, match=r"did not include the regularizer.*add_regularizer"):
        make_trainer([SparsifyCallback(N)], 1, limit_train_batches=1).fit(Lit(net, None), make_loader())
    net = bs.sparsify(make_mlp(), method="vd")
    with pytest.raises(ValueError, match=r"num_data=\[100\] but the callback has num_data=256"):
        make_trainer([SparsifyCallback(N)], 1, limit_train_batches=1).fit(Lit(net, 100), make_loader())


def test_num_data_unlike_dataset_length_warns_and_max_steps_needs_epochs():
    net = bs.sparsify(make_mlp(), method="vd")
    with pytest.warns(UserWarning, match="training dataset has 256 examples"):
        make_trainer([SparsifyCallback(BATCH)], 1, limit_train_batches=1).fit(Lit(net, BATCH), make_loader())
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[SparsifyCallback(N)])
    with pytest.raises(ValueError, match="pass epochs="):
        trainer.fit(Lit(bs.sparsify(make_mlp(), method="vd"), N), make_loader())
    cb = SparsifyCallback(N, epochs=1)
    pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb]).fit(Lit(bs.sparsify(make_mlp(), method="vd"), N),
                                                               make_loader())
    assert cb.epochs == 1 and cb.densities


def test_step_hook_uses_each_layers_param_group_lr_and_skips_frozen_layers():
    from bayes_sparse.integrations._common import step_hook

    net = bs.sparsify(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)), method="l1", proximal=True)
    calls = {}
    for name, layer in bs.sparse_layers(net):
        layer.after_step = lambda lr, n, _name=name: calls.setdefault(_name, (lr, n))
    opt = torch.optim.SGD([{"params": net[0].parameters(), "lr": 0.1}, {"params": net[1].parameters(), "lr": 0.01}])
    step_hook(net, [opt], N)  # net[2] is in no optimizer: left alone
    assert calls == {"0": (0.1, N), "1": (0.01, N)}
