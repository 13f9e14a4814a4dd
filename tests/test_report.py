import json

import pytest
import torch
from torch import nn

import bayes_sparse as bs


def test_counts_density_compression_and_serialization():
    net = nn.Sequential(bs.VDLinear(10, 20), nn.ReLU(), nn.Linear(20, 5), nn.BatchNorm1d(5))
    mask = torch.zeros(20, 10, dtype=torch.bool)
    mask[:, :3] = True
    net[0].set_mask_(mask)
    with torch.no_grad():
        net[2].weight[:, :10] = 0
    rep = bs.report(net, test_error_percent=1.5)
    assert [(r.name, r.type, r.shape, r.weights, r.nonzero) for r in rep.layers] == [
        ("0", "VDLinear", (20, 10), 200, 60), ("2", "Linear", (5, 20), 100, 50)]
    assert rep.weights == 300 and rep.nonzero == 110
    assert rep.density == pytest.approx(110 / 300) and rep.compression == pytest.approx(300 / 110)
    d = json.loads(rep.to_json())
    assert d["total"] == {"weights": 300, "nonzero": 110, "density": pytest.approx(110 / 300),
                          "compression": pytest.approx(300 / 110)}
    assert d["layers"][0]["density"] == pytest.approx(0.3) and d["test_error_percent"] == 1.5
    text = str(rep)
    assert "VDLinear" in text and "20x10" in text and "total" in text and "2.7x" in text and "36.67%" in text


def test_empty_layer_compression_is_inf_and_json_null():
    layer = bs.VDLinear(2, 2)
    layer.set_mask_(torch.zeros(2, 2, dtype=torch.bool))
    rep = bs.report(layer)
    assert rep.compression == float("inf") and rep.to_dict()["total"]["compression"] is None
    assert "inf" in str(rep)


def test_report_counts_attention_rnn_and_tied_weights_like_the_dense_export():
    from tests.test_architectures import TiedLM

    for make in (TiedLM, lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)):
        net = bs.sparsify(make(), method="magnitude")
        bs.threshold_(net, sparsity=0.75)
        sparse, dense = bs.report(net), bs.report(bs.to_dense(net))
        assert sparse.weights == dense.weights == sum(p.numel() for p in set(make().parameters()) if p.dim() >= 2)
        assert sparse.nonzero == dense.nonzero
        assert sparse.density == pytest.approx(0.25, abs=0.01)
