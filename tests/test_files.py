"""lit_prune.files: atomic writes with ordinary modes."""

import os
import stat

import pytest

from lit_prune.files import atomic_path, staging_dir, write_text_atomic


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_file_has_the_umask_mode_and_content(tmp_path, umask):
    target = tmp_path / "deep" / "a.json"
    write_text_atomic(target, "[1, 2]")
    assert target.read_text() == "[1, 2]"
    assert mode(target) == 0o666 & ~umask
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as handle:
                handle.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_staging_dir_has_a_folder_mode(tmp_path, umask):
    folder = staging_dir(tmp_path, ".x-")
    assert folder.parent == tmp_path and folder.name.startswith(".x-")
    assert mode(folder) == 0o777 & ~umask


def test_unwritable_folders_name_the_field_other_errors_pass_through(tmp_path):
    from lit_prune.errors import LitPruneError
    from lit_prune.files import writing_into

    with pytest.raises(
        LitPruneError, match=r"^data.cache_dir='/x' is invalid: .*\(/x/y: Permission denied\)$"
    ):
        with writing_into("data.cache_dir", "/x"):
            raise PermissionError(13, "Permission denied", "/x/y")
    with pytest.raises(LitPruneError, match=r"^data.cache_dir='/x/y' is invalid: .*\(/x: No such file"):
        with writing_into("data.cache_dir", "/x/y"):  # mkdir in /proc, say: the folder cannot be created
            raise FileNotFoundError(2, "No such file or directory", "/x")
    with pytest.raises(FileNotFoundError):  # a missing input is not the folder's fault
        with writing_into("data.cache_dir", "/x"):
            raise FileNotFoundError(2, "No such file or directory", "/in.txt")


def test_temporaries_of_ended_processes_of_this_host_are_removed(tmp_path):
    import socket
    import subprocess
    import sys

    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host, dead, alive = socket.gethostname(), int(ended.stdout), os.getpid()
    names = {
        "dead_file": f".a.json-{host}~{dead}~x1.tmp",
        "dead_dir": f".rep-{host}~{dead}~x2",
        "alive": f".a.json-{host}~{alive}~x3.tmp",
        "other_host": f".a.json-{host}x~{dead}~x4.tmp",
        "other_name": f".a.jsonl-{host}~{dead}~x5.tmp",
    }
    for key, name in names.items():
        (tmp_path / name).mkdir() if key == "dead_dir" else (tmp_path / name).write_text("")
    write_text_atomic(tmp_path / "a.json", "{}")
    staging_dir(tmp_path, ".rep-").rmdir()
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"a.json", names["alive"], names["other_host"], names["other_name"]}
