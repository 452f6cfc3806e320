"""Atomic writes (:mod:`solverlab._io`): leftovers of killed writes are removed unless a live
writer holds them, and result sets replace their folder whole."""

from __future__ import annotations

import logging
import os

import pytest

from solverlab import _io
from solverlab.errors import OptionError

fcntl = pytest.importorskip("fcntl")


def held(path):
    """Open and lock ``path`` as a live writer does; returns the fd to close."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_file_write_removes_dead_leftovers_and_keeps_live_ones(tmp_path, caplog):
    dead = tmp_path / ".a.txt.0badf00d.tmp"
    old_style = tmp_path / ".a.txt.k2_x9qzr.tmp"  # mkstemp's names, earlier versions
    live = tmp_path / ".a.txt.12345678.tmp"
    other = tmp_path / ".b.txt.0badf00d.tmp"  # another file's
    for p in (dead, old_style, live, other):
        p.write_text("partial")
    fd = held(live)
    try:
        with caplog.at_level(logging.WARNING, logger="solverlab"):
            _io.write_text(tmp_path / "a.txt", "new\n")
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a.txt", live.name, other.name])
    assert (tmp_path / "a.txt").read_text() == "new\n"
    assert str(dead) in caplog.text and str(old_style) in caplog.text
    assert str(live) not in caplog.text


def test_a_failed_file_write_leaves_the_old_file_and_no_temporary(tmp_path):
    _io.write_text(tmp_path / "a.txt", "old")

    def write(f):
        f.write("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _io.atomic_write(tmp_path / "a.txt", write)
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "old"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_replaced_file_keeps_its_mode(tmp_path):
    target = tmp_path / "a.txt"
    _io.write_text(target, "1")
    target.chmod(0o600)
    _io.write_text(target, "2")
    assert target.stat().st_mode & 0o777 == 0o600 and target.read_text() == "2"


def write_set(folder, names, text, owned=("*.txt",)):
    with _io.atomic_folder(folder, owned=owned) as tmp:
        real = folder.resolve()
        assert tmp.parent == real.parent and tmp.name.startswith(f".{real.name}.")
        for n in names:
            _io.write_text(tmp / n, text)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_set_replaces_its_folder_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    write_set(out, ["a.txt", "b.txt"], "1")
    inode = out.stat().st_ino
    write_set(out, ["a.txt", "b.txt"], "2")
    assert out.stat().st_ino != inode  # a new folder, not files rewritten in place
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.txt": "2", "b.txt": "2"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_owned_files_the_set_does_not_write_are_kept(tmp_path):
    out = tmp_path / "out"
    owned = ("order-*.json",)
    write_set(out, ["order-heun.json"], "heun", owned)
    write_set(out, ["order-euler.json"], "euler", owned)
    write_set(out, ["order-heun.json"], "heun 2", owned)
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "order-heun.json": "heun 2", "order-euler.json": "euler"}


def test_a_folder_with_foreign_files_is_refused_untouched(tmp_path):
    out = tmp_path / "out"
    write_set(out, ["a.txt"], "1")
    (out / "notes.md").write_text("mine")
    (out / "sub").mkdir()
    with pytest.raises(OptionError) as e:
        write_set(out, ["a.txt"], "2")
    msg = str(e.value)
    assert "'notes.md'" in msg and "'sub'" in msg and "'*.txt'" in msg and "new or empty" in msg
    assert (out / "a.txt").read_text() == "1" and (out / "notes.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OptionError, match="is a file"):
        write_set(tmp_path / "file", ["a.txt"], "2")


def test_an_exception_in_the_block_leaves_the_old_set(tmp_path):
    out = tmp_path / "out"
    write_set(out, ["a.txt", "b.txt"], "1")
    with pytest.raises(KeyboardInterrupt):
        with _io.atomic_folder(out, owned=["*.txt"]) as tmp:
            _io.write_text(tmp / "a.txt", "2")
            raise KeyboardInterrupt
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.txt": "1", "b.txt": "1"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_set_removes_dead_leftover_folders_and_keeps_live_ones(tmp_path, caplog):
    out = tmp_path / "out"
    dead, live = tmp_path / ".out.0badf00d.part", tmp_path / ".out.12345678.part"
    for p in (dead, live):
        p.mkdir()
        (p / "a.txt").write_text("half")
    # a killed write of an earlier version left a temporary file in the folder itself
    out.mkdir()
    (out / ".a.txt.k2_x9qzr.tmp").write_text("half")
    fd = held(live)
    try:
        with caplog.at_level(logging.WARNING, logger="solverlab"):
            write_set(out, ["a.txt"], "new")
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    assert f"removed {dead}" in caplog.text and str(live) not in caplog.text


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_replaced_folder_keeps_its_mode_and_a_symlink_is_followed(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    real.chmod(0o711)
    link = tmp_path / "link"
    link.symlink_to(real)
    write_set(link, ["a.txt"], "1")
    assert link.is_symlink() and (real / "a.txt").read_text() == "1"
    assert real.stat().st_mode & 0o777 == 0o711
