import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from batchpilot import BatchpilotError, get_workload, list_workloads
from batchpilot.workloads import Target


@pytest.mark.parametrize("name", ["mnist1d-mlp", "mnist1d-cnn", "digits-cnn-bn", "charlm"])
def test_builtin_forward_and_loss(name):
    w = get_workload(name)
    torch.manual_seed(0)
    model = w.make_model()
    x, y = w.train_data[:8]
    out = model(x)
    loss = w.loss_sum(out, y) / w.count_units(y)
    assert torch.isfinite(loss)
    # An untrained classifier's mean cross-entropy is near ln(num classes).
    n_classes = out.shape[-1]
    assert abs(float(loss.detach()) - np.log(n_classes)) < 1.0
    assert w.base_batch >= 1 and w.base_lr > 0
    assert len(w.val_data) > 0


def test_list_workloads_names():
    assert {"mnist1d-mlp", "mnist1d-cnn", "digits-cnn-bn", "charlm"} <= set(list_workloads())


def test_mnist1d_default_split_and_size_option():
    w = get_workload("mnist1d-cnn")
    assert (len(w.train_data), len(w.val_data)) == (4000, 1000)
    small = get_workload("mnist1d-mlp", num_train=600, num_val=200)
    assert (len(small.train_data), len(small.val_data)) == (600, 200)


def test_generation_leaves_global_rng_untouched():
    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    get_workload("mnist1d-mlp", num_train=300, num_val=100)
    assert (random.random(), np.random.rand()) == before


def test_charlm_loss_is_per_token():
    w = get_workload("charlm")
    x, y = w.train_data[:3]
    assert w.count_units(y) == y.numel() == 3 * w.seq_len


def test_unknown_workload_lists_known():
    with pytest.raises(BatchpilotError, match="unknown workload 'resnet-9000'; known: charlm, digits-cnn-bn, .*mnist1d-cnn, mnist1d-mlp"):
        get_workload("resnet-9000")


def test_user_workload_from_file(tmp_path):
    path = tmp_path / "my_wl.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch.utils.data import TensorDataset
        from batchpilot import Workload

        def make_workload():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(64, 3, generator=g); y = (x.sum(1) > 0).long()
            return Workload(name="toy", make_model=lambda: torch.nn.Linear(3, 2),
                            train_data=TensorDataset(x, y), val_data=TensorDataset(x, y),
                            loss_sum=lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="sum"),
                            make_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), base_batch=8, base_lr=0.1)
    """))
    w = get_workload(f"{path}:make_workload")
    assert w.name == "toy" and w.num_train == 64
    with pytest.raises(BatchpilotError, match="no callable 'nope'"):
        get_workload(f"{path}:nope")


def test_user_workload_that_does_not_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import not_a_real_module_xyz\n")
    with pytest.raises(BatchpilotError, match="failed to import: ModuleNotFoundError"):
        get_workload(f"{path}:make_workload")
    with pytest.raises(BatchpilotError, match="failed to import"):
        get_workload("not_a_real_pkg_xyz.mod:fn")


def test_workload_module_path():
    w = get_workload("batchpilot.workloads.digits:digits_cnn_bn")
    assert w.name == "digits-cnn-bn"


def test_target_parse():
    t = Target.parse("val_acc>=0.85")
    assert (t.metric, t.op, t.value) == ("val_acc", ">=", 0.85)
    assert t.reached(0.9) and not t.reached(0.8)
    with pytest.raises(BatchpilotError, match="target must look like"):
        Target.parse("accuracy is high")


def test_cli_workloads_json():
    out = subprocess.run([sys.executable, "-m", "batchpilot", "workloads", "--json"], capture_output=True, text=True, check=True)
    assert "mnist1d-cnn" in out.stdout


def test_mnist1d_disk_cache_round_trip(tmp_path, monkeypatch):
    from batchpilot.workloads import mnist1d

    monkeypatch.setenv("BATCHPILOT_CACHE", str(tmp_path))
    fresh = mnist1d._generate.__wrapped__(200, 100, 42)
    assert mnist1d._cache_path(200, 100, 42).exists()
    cached = mnist1d._generate.__wrapped__(200, 100, 42)
    assert all(torch.equal(a, b) for a, b in zip(fresh, cached))


def test_memory_only_workload_is_not_trained(mlp_workload):
    import dataclasses

    from batchpilot.train import TrainConfig, Trainer

    fake = dataclasses.replace(mlp_workload, name="hf:toy", memory_only=True)
    with pytest.raises(BatchpilotError, match="memory-only"):
        Trainer(fake, TrainConfig(global_batch=8, steps=1))
