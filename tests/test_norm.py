"""BatchNorm: detection, conversion (Sync/Group/Ghost), and the measured bias of accumulation."""

import pytest
import torch
from torch import nn

from batchpilot import BatchpilotError, get_workload
from batchpilot.norm import GhostBatchNorm, batchnorm_caveats, convert_batchnorm, find_batchnorm, has_batchnorm
from batchpilot.train.bn_bias import measure_bn_accumulation_bias


@pytest.fixture(scope="module")
def digits():
    return get_workload("digits-cnn-bn")


def test_detects_batchnorm_only_where_it_is(digits):
    assert find_batchnorm(digits.make_model()) == ["net.1", "net.4"]
    cnn = get_workload("mnist1d-cnn", num_train=100, num_val=20).make_model()
    assert find_batchnorm(cnn) == [] and not has_batchnorm(cnn)
    assert find_batchnorm(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.LayerNorm(3))) == ["1"]


def test_group_norm_conversion_is_batch_free_and_leaves_the_original(digits):
    torch.manual_seed(0)
    model = digits.make_model()
    with torch.no_grad():
        model.net[1].weight.uniform_(0.5, 1.5)
    gn = convert_batchnorm(model, "group", groups=4)
    assert find_batchnorm(gn) == [] and find_batchnorm(model) == ["net.1", "net.4"]  # a copy; original intact
    norms = [m for m in gn.modules() if isinstance(m, nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [(4, 16), (4, 32)]
    assert torch.equal(norms[0].weight, model.net[1].weight)
    x = torch.randn(10, 1, 8, 8)
    gn.train()
    alone = gn(x[:1])
    in_batch = gn(x)[:1]
    torch.testing.assert_close(alone, in_batch)  # a sample's output does not depend on its batch-mates
    model.train()
    assert not torch.allclose(model(x[:2])[:1], model(x)[:1])  # ...whereas BatchNorm's does


def test_sync_conversion(digits):
    sync = convert_batchnorm(digits.make_model(), "sync")
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in sync.modules()) == 2


def test_ghost_batch_norm_normalises_each_virtual_batch(digits):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    ghost = GhostBatchNorm(bn, ghost_batch=16)
    ref = nn.BatchNorm2d(3)
    x = torch.randn(64, 3, 4, 4) * 3 + 1
    out = ghost(x)
    expected = torch.cat([ref(chunk) for chunk in torch.split(x, 16)])
    torch.testing.assert_close(out, expected)
    assert int(bn.num_batches_tracked) == 4  # running statistics updated once per ghost batch
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    ghost.eval()
    ref.eval()
    torch.testing.assert_close(ghost(x), ref(x))
    converted = convert_batchnorm(digits.make_model(), "ghost", ghost_batch=8)
    assert sum(isinstance(m, GhostBatchNorm) for m in converted.modules()) == 2
    assert converted(torch.randn(32, 1, 8, 8)).shape == (32, 10)


def test_conversion_errors():
    with pytest.raises(BatchpilotError, match="no BatchNorm"):
        convert_batchnorm(nn.Linear(2, 2), "group")
    with pytest.raises(BatchpilotError, match="target"):
        convert_batchnorm(nn.BatchNorm1d(2), "layer")
    with pytest.raises(BatchpilotError, match="ghost batch"):
        GhostBatchNorm(nn.BatchNorm1d(2), 1)


def test_accumulation_bias_is_measured_for_batchnorm_and_zero_without(digits):
    b_full = measure_bn_accumulation_bias(digits, 64, 64, batches=2)
    b32 = measure_bn_accumulation_bias(digits, 64, 32, batches=2)
    b4 = measure_bn_accumulation_bias(digits, 64, 4, batches=2)
    assert b_full == 0.0
    assert 1e-3 < b32 < b4  # smaller micro-batches: noisier statistics, larger bias
    mlp = get_workload("mnist1d-mlp", num_train=200, num_val=20)
    assert measure_bn_accumulation_bias(mlp, 64, 4, batches=2) < 1e-12  # exact without BN (float64)
    with pytest.raises(BatchpilotError, match="micro batch"):
        measure_bn_accumulation_bias(digits, 64, 128)


def test_caveats_cite_the_measurement(digits):
    model = digits.make_model()
    caveats = batchnorm_caveats(model, 8, 4, measured_bias=0.0703)
    assert len(caveats) == 2 and "8 samples" in caveats[0] and "7.0%" in caveats[1]
    assert batchnorm_caveats(model, 32, 1) == []
    assert batchnorm_caveats(nn.Linear(2, 2), 2, 8) == []
