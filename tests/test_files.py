"""qatlab.files: the build folder and the atomic writers (old file or new file, never half of one)."""

import doctest

import pytest
import torch

from qatlab import files


def test_doctest():
    assert doctest.testmod(files).failed == 0


def test_build_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QATLAB_BUILD", str(tmp_path / "out" / "deep"))
    path = files.build_dir()
    assert path == tmp_path / "out" / "deep" and path.is_dir()


def test_write_text_and_bytes_round_trip(tmp_path):
    assert files.write_atomic(tmp_path / "a.txt", "π = 3.14\n").read_text(encoding="utf-8") == "π = 3.14\n"
    assert files.write_atomic(tmp_path / "b.bin", b"\x00\xff").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]  # no .tmp left behind


def test_save_atomic_round_trip(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    loaded = torch.load(files.save_atomic(state, tmp_path / "m.pt"))
    assert torch.equal(loaded["w"], state["w"])


def test_failed_save_keeps_old_file_and_removes_temporary(tmp_path):
    target = files.write_atomic(tmp_path / "table.csv", "old\n")

    def half_then_crash(tmp):
        tmp.write_text("half a ta")
        raise KeyboardInterrupt  # an interrupted run, not only an error

    with pytest.raises(KeyboardInterrupt):
        files.atomic(target, half_then_crash)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]
