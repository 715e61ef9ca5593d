"""Atomic writes: the target holds the old bytes or the new ones, and nothing else is left behind."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from batchpilot.files import atomic_torch_save, atomic_write, atomic_write_json, atomic_write_text, atomic_write_with


def test_writes_and_replaces(tmp_path):
    p = tmp_path / "summary.json"
    atomic_write_json(p, {"a": 1})
    assert p.read_text() == '{\n  "a": 1\n}\n'
    atomic_write_text(p, "second")
    assert p.read_text() == "second"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_torch_save(tmp_path / "c.pt", {"w": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.pt", "summary.json"]


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, exc):
    p = tmp_path / "checkpoint.pt"
    p.write_bytes(b"old")

    def half_then_fail(fh):
        fh.write(b"new but only half")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write_with(p, half_then_fail)
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_unserializable_json_touches_nothing(tmp_path):
    p = tmp_path / "plan.json"
    with pytest.raises(ValueError):
        atomic_write_json(p, {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_the_old_predictable_temp_path_is_not_used(tmp_path):
    """A file (or a planted symlink) at ``name.tmp`` is neither written through nor removed."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "checkpoint.pt.tmp").symlink_to(victim)
    atomic_write(tmp_path / "checkpoint.pt", b"data")
    assert victim.read_text() == "keep" and (tmp_path / "checkpoint.pt").read_bytes() == b"data"
    assert (tmp_path / "checkpoint.pt.tmp").is_symlink()


def test_permissions_and_symlinks_behave_like_open(tmp_path):
    p = tmp_path / "report.html"
    atomic_write_text(p, "a")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    os.chmod(p, 0o640)
    atomic_write_text(p, "b")
    assert stat.S_IMODE(p.stat().st_mode) == 0o640  # an existing file keeps its mode
    link = tmp_path / "latest.html"
    link.symlink_to(p)
    atomic_write_text(link, "c")
    assert link.is_symlink() and p.read_text() == "c"


def test_ctrl_c_inside_torch_save_stays_a_keyboard_interrupt(tmp_path, monkeypatch):
    """Ctrl-C inside torch's zip writer: torch's clean-up fails ('unexpected pos ...') and raises a RuntimeError
    while handling the KeyboardInterrupt; the trainer must see the interrupt (exit 130), not a traceback."""
    target = tmp_path / "checkpoint.pt"
    atomic_torch_save(target, {"step": 1})
    real_save = torch.save

    def interrupted_save(obj, fh):
        real_save({"step": 2}, fh)  # some bytes written, as in a real interrupted save
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 361216 vs 361168")

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save(target, {"step": 2})
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    monkeypatch.setattr(torch, "save", lambda obj, fh: (_ for _ in ()).throw(RuntimeError("disk says no")))
    with pytest.raises(RuntimeError, match="disk says no"):  # other errors are left alone
        atomic_torch_save(target, {"step": 3})
