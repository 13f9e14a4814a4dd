import pytest
import torch
from torch import nn

import bayes_sparse as bs

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
pytest.importorskip("onnxscript", reason="onnxscript is not installed")


def test_onnx_export_matches_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), bs.VDConv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                        bs.VDLinear(144, 10))
    with torch.no_grad():
        for m in net:
            if isinstance(m, bs.SparseLayer):
                m.log_sigma2.uniform_(-12, 6)
    bs.threshold_(net)
    path = bs.export.to_onnx(net, torch.rand(2, 64), tmp_path / "m.onnx")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.rand(5, 64)  # another batch size than exported with
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), net.eval()(x), rtol=1e-4, atol=1e-5)


def test_onnx_export_leaves_the_callers_model_in_its_mode(tmp_path):
    net = nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.5)).train()
    bs.export.to_onnx(net, torch.rand(2, 4), tmp_path / "m.onnx")
    assert net.training
