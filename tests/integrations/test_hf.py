"""Hugging Face Trainer integration: loss and gradients against a hand-built objective (with gradient
accumulation, both loss conventions), schedules, masks, export, evaluation loss, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import bayes_sparse as bs  # noqa: E402
from tests.integrations._reference import ltp_penalty_by_hand  # noqa: E402
from bayes_sparse.integrations.hf import SparseTrainer, SparsifyTrainerCallback, add_regularizer  # noqa: E402

N, BATCH, D_IN, N_CLASSES = 256, 32, 8, 3


class MLPClassifier(nn.Module):
    """A tiny model in the Hugging Face style: ``forward(x, labels)`` returns ``{"loss", "logits"}``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IN, 16), nn.ReLU(), nn.Linear(16, N_CLASSES))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class MLPSumLoss(MLPClassifier):
    """Takes the Trainer's loss kwargs: its loss is normalised over the whole accumulated batch."""

    def forward(self, x, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.net(x)
        loss = F.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch
        return {"loss": loss, "logits": logits}


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = N, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, D_IN, generator=g)
        self.y = (self.x[:, :N_CLASSES] * 2).argmax(1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def make_args(tmp_path, epochs: int = 3, **kwargs) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, num_train_epochs=epochs,
                per_device_train_batch_size=BATCH, per_device_eval_batch_size=64, learning_rate=0.05,
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, save_strategy="no",
                logging_strategy="no", disable_tqdm=True, remove_unused_columns=False, seed=0,
                dataloader_num_workers=0)
    base.update(kwargs)
    return TrainingArguments(**base)


class SpyTrainer(SparseTrainer):
    """Records, per optimizer step, the model before it, every micro-batch and the loss each contributed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[dict] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.steps[-1]["inputs"].append({k: v.clone() for k, v in inputs.items()})
        self.steps[-1]["losses"].append(loss.item())
        return loss


class StepRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.trainer: SpyTrainer | None = None
        self.epoch_state: dict[int, tuple[float, float]] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        ltp = next(m for m in model.modules() if isinstance(m, bs.LTP))
        self.epoch_state.setdefault(int(state.epoch + 1e-6), (ltp.reg_weight, ltp.temperature))
        self.trainer.steps.append({"before": copy.deepcopy(model), "inputs": [], "losses": []})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.trainer.steps[-1]["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_cls, ga", [(MLPClassifier, 1), (MLPClassifier, 2), (MLPSumLoss, 2)],
                         ids=["mean-loss", "mean-loss-accumulated", "loss-kwargs-accumulated"])
def test_trainer_regularized_schedules_thresholds_exports(tmp_path, model_cls, ga):
    epochs = 3
    model = bs.sparsify(model_cls(), method="ltp", warmup=(0.0, 0.5), penalty=2.0)
    rec = StepRecorder()
    trainer = SpyTrainer(model=model, args=make_args(tmp_path, epochs, gradient_accumulation_steps=ga),
                         train_dataset=DictDataset(), callbacks=[rec])
    rec.trainer = trainer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    ours = [str(w.message) for w in caught if "regularizer" in str(w.message) or "num_data" in str(w.message)]
    assert not ours

    # (1) per optimizer step: the summed micro-batch losses and the gradients equal mean NLL + penalty / N
    assert trainer.sparse_callback.num_data == N
    assert len(trainer.steps) == epochs * N // (BATCH * ga)
    reg_seen = 0.0
    for step in trainer.steps:
        assert len(step["inputs"]) == ga
        ref = step["before"].train()
        x = torch.cat([b["x"] for b in step["inputs"]])
        y = torch.cat([b["labels"] for b in step["inputs"]])
        reg = ltp_penalty_by_hand(ref) / N
        loss = F.cross_entropy(ref.net(x), y) + reg
        names, params = zip(*ref.named_parameters())
        grads = torch.autograd.grad(loss, params)
        assert sum(step["losses"]) == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
        for name, g in zip(names, grads):
            torch.testing.assert_close(step["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        reg_seen = max(reg_seen, reg.item())
    assert reg_seen > 0.01

    # (2) the schedules ran at each epoch's start
    assert sorted(rec.epoch_state) == list(range(epochs))
    assert [rec.epoch_state[e][0] for e in range(epochs)] == pytest.approx([0.0, 2 / 3, 1.0])
    assert [rec.epoch_state[e][1] for e in range(epochs)] == pytest.approx(
        [bs.temperature_schedule(e, epochs, 0.25, 0.0025) for e in range(epochs)])

    # (3) masks fixed at the end, something pruned
    assert all(m.mask_fixed for _, m in bs.sparse_layers(model))
    assert bs.report(model).compression > 1.0
    assert min(trainer.sparse_callback.densities.values()) < 1.0

    # (4) the export loads into the original architecture
    plain = model_cls()
    plain.load_state_dict(bs.to_dense(model).state_dict())
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(plain.net(x), model.eval().net(x))


def test_evaluation_loss_has_no_regularizer_and_threshold_keywords(tmp_path):
    model = bs.sparsify(MLPClassifier(), method="vd")
    data = DictDataset()
    trainer = SparseTrainer(model=model, args=make_args(tmp_path, 1), train_dataset=data,
                            threshold={"sparsity": 0.75})
    trainer.train()
    assert trainer.sparse_callback.densities == pytest.approx({"net.0": 0.25, "net.2": 0.25}, abs=0.02)
    metrics = trainer.evaluate(DictDataset(64, seed=2))
    model.eval()
    ev = DictDataset(64, seed=2)
    with torch.no_grad():
        expected = F.cross_entropy(model.net(ev.x), ev.y).item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_after_step_gets_the_lr_of_each_step(tmp_path):
    """Proximal L1 runs once per optimizer step with the lr that step used (the scheduler moves it after)."""
    model = bs.sparsify(MLPClassifier(), method="l1", proximal=True, penalty=1.0)
    calls = []
    for name, layer in bs.sparse_layers(model):
        original = layer.after_step
        layer.after_step = lambda lr, n, _o=original, _name=name: (calls.append((_name, lr, n)), _o(lr, n))[1]
    args = make_args(tmp_path, 1, learning_rate=0.1, lr_scheduler_type="linear", optim="sgd",
                     gradient_accumulation_steps=2)
    trainer = SparseTrainer(model=model, args=args, train_dataset=DictDataset(), threshold=False)
    trainer.train()
    steps = N // BATCH // 2
    expected = [0.1 * (1 - k / steps) for k in range(steps)]
    for name in ("net.0", "net.2"):
        got = [(lr, n) for layer, lr, n in calls if layer == name]
        assert [lr for lr, _ in got] == pytest.approx(expected)
        assert {n for _, n in got} == {N}
    assert not any(m.mask_fixed for _, m in bs.sparse_layers(model))


def test_plain_trainer_with_the_callback_warns_without_regularizer(tmp_path):
    model = bs.sparsify(MLPClassifier(), method="vd")
    trainer = Trainer(model=model, args=make_args(tmp_path, 1, max_steps=1), train_dataset=DictDataset(),
                      callbacks=[SparsifyTrainerCallback(N, epochs=1)])
    with pytest.warns(UserWarning, match=r"did not include the regularizer.*SparseTrainer"):
        trainer.train()
    assert all(m.mask_fixed for _, m in bs.sparse_layers(model))


def test_errors_say_what_to_fix(tmp_path):
    with pytest.raises(ValueError, match="num_data must be a positive int"):
        SparseTrainer(model=bs.sparsify(MLPClassifier()), args=make_args(tmp_path), train_dataset=DictDataset(),
                      num_data=0)
    with pytest.raises(ValueError, match="num_data must be a positive int"):
        SparsifyTrainerCallback(num_data=2.0)
    with pytest.raises(TypeError, match="threshold_ does not take"):
        SparsifyTrainerCallback(N, threshold={"scop": "global"})
    trainer = SparseTrainer(model=MLPClassifier(), args=make_args(tmp_path, 1), train_dataset=DictDataset())
    with pytest.raises(ValueError, match=r"no sparse layers.*sparsify"):
        trainer.train()

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            data = DictDataset()
            return (data[i] for i in range(len(data)))

    trainer = SparseTrainer(model=bs.sparsify(MLPClassifier()), args=make_args(tmp_path, 1, max_steps=2),
                            train_dataset=Stream())
    with pytest.raises(ValueError, match=r"has no length; pass SparseTrainer\(\.\.\., num_data=N\)"):
        trainer.train()
    trainer = SparseTrainer(model=bs.sparsify(MLPClassifier()), args=make_args(tmp_path, 1, max_steps=2),
                            train_dataset=Stream(), num_data=N)
    with pytest.raises(ValueError, match="pass epochs="):
        trainer.train()
    trainer = SparseTrainer(model=bs.sparsify(MLPClassifier()), args=make_args(tmp_path, 1, max_steps=2),
                            train_dataset=Stream(), num_data=N, epochs=1)
    trainer.train()
    assert trainer.sparse_callback.densities
    with pytest.raises(TypeError, match="loss must be a torch.Tensor"):
        add_regularizer(1.0, bs.sparsify(MLPClassifier()), N)
