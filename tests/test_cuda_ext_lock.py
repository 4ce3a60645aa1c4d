"""cuda_ext.clear_stale_lock: a build lock that a killed build left behind is removed (every later build would
wait on it for ever); a recent one is another build's, and the wait names the file."""

from __future__ import annotations

import os
import time

from fusedrl.kernels import cuda_ext


def test_a_stale_lock_is_removed_and_a_recent_one_waited_for(tmp_path, capsys, caplog, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "FileBaton", object, raising=False)  # torch < 2.14's lock (the GPU image's)
    capsys.readouterr()  # what importing cpp_extension printed
    assert cuda_ext.clear_stale_lock(tmp_path) is False  # no lock: nothing to say
    assert capsys.readouterr().err == ""
    lock = tmp_path / "lock"
    lock.touch()
    assert cuda_ext.clear_stale_lock(tmp_path) is False and lock.exists()
    assert f"waiting for the build that holds {lock}" in capsys.readouterr().err
    old = time.time() - cuda_ext.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    assert cuda_ext.clear_stale_lock(tmp_path) is True and not lock.exists()
    assert "stale build lock" in caplog.text


def test_an_os_file_lock_is_left_alone(tmp_path, monkeypatch):
    """torch >= 2.14 locks the build folder with an OS file lock: the file stays after every build, unlocked, and
    one that looks old may be held by a build running now: nothing is removed."""
    from torch.utils import cpp_extension

    monkeypatch.delattr(cpp_extension, "FileBaton", raising=False)
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - cuda_ext.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    assert cuda_ext.clear_stale_lock(tmp_path) is False and lock.exists()
