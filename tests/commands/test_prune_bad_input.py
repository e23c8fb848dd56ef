"""Issue #25 for `prune` (and the network): --overwrite replaces only an earlier prune output, I/O
failures are one line naming the path and the cause with the old output kept, outputs get umask
modes, and a fit and a prune on a local corpus make no network request."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import ROOT, cli_in_process

from lit_prune.commands.prune import REPORT_FILE


@pytest.fixture
def argv(tmp_path, model_cache, local_corpus, data_cache):
    """`prune` arguments for a fast magnitude run of tiny-llama on the local corpus (output last)."""

    def make(output: Path, *extra: str) -> list[str]:
        return [
            "prune",
            "--model=tiny-llama",
            "--method=magnitude",
            "--sparsity=0.5",
            f"--corpus={local_corpus}",
            "--eval_sequences=2",
            "--eval_seq_len=32",
            "--no_progress",
            f"--model_cache_dir={model_cache}",
            f"--cache_dir={data_cache}",
            *extra,
            f"--output={output}",
        ]

    return make


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# --- 2: --overwrite never deletes what prune did not write ---------------------------------
def _foreign_targets(tmp_path: Path) -> dict[str, Path]:
    repo = tmp_path / "project"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "thesis.tex").write_text("\\chapter{mine}")
    plain = tmp_path / "notes.txt"
    plain.write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(repo)
    return {"repository": repo, "plain_file": plain, "symlink": link}


def test_overwrite_refuses_what_is_not_an_earlier_prune_output(tmp_path, argv):
    targets = _foreign_targets(tmp_path)
    before = _snapshot(tmp_path)
    for name, target in targets.items():
        code, stderr = cli_in_process(*argv(target, "--overwrite"), cwd=tmp_path)
        assert code == 2, name
        assert _error(stderr).startswith(
            f"error: output='{target}' is invalid: expected a new path or an earlier"
        )
    assert _snapshot(tmp_path) == before and (tmp_path / "link").is_symlink()


def test_overwrite_keeps_a_foreign_file_put_into_an_earlier_output(tmp_path, argv):
    out = tmp_path / "out"
    assert cli_in_process(*argv(out), cwd=tmp_path)[0] == 0
    assert "files" in json.loads((out / REPORT_FILE).read_text())
    (out / "my_notes.md").write_text("mine")
    before = _snapshot(out)
    code, stderr = cli_in_process(*argv(out, "--overwrite", "--sparsity=0.7"), cwd=tmp_path)
    assert code == 2 and "(not my_notes.md)" in _error(stderr)
    assert _snapshot(out) == before
    (out / "my_notes.md").unlink()  # an earlier output, as prune wrote it: replaced
    assert cli_in_process(*argv(out, "--overwrite", "--sparsity=0.7"), cwd=tmp_path)[0] == 0
    assert json.loads((out / REPORT_FILE).read_text())["sparsity"] == 0.7


# --- 6: I/O failures ------------------------------------------------------------------------
@pytest.mark.parametrize("output", ["/proc/lit_prune_out", "/proc/lit_prune/out"])
def test_unwritable_output_is_refused_before_the_work(tmp_path, argv, output, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("lit_prune.models.registry.load_model", no_work)
    code, stderr = cli_in_process(*argv(Path(output)), cwd=tmp_path)
    assert code == 2 and _error(stderr).startswith(
        f"error: output='{output}' is invalid: expected a directory"
    )


def test_disk_full_while_writing_is_one_line_and_keeps_the_old_output(tmp_path, argv, monkeypatch):
    out = tmp_path / "out"
    assert cli_in_process(*argv(out), cwd=tmp_path)[0] == 0
    before = _snapshot(out)

    def disk_full(masks, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("lit_prune.pruning.save_masks", disk_full)
    code, stderr = cli_in_process(*argv(out, "--overwrite", "--sparsity=0.7"), cwd=tmp_path)
    line = _error(stderr)
    assert code == 2 and line.startswith(f"error: output='{out}': could not be written (")
    assert "No space left on device" in line
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- 8: umask modes -------------------------------------------------------------------------
def test_prune_output_gets_umask_modes(tmp_path, argv):
    old = os.umask(0o022)
    try:
        assert cli_in_process(*argv(tmp_path / "out"), cwd=tmp_path)[0] == 0
    finally:
        os.umask(old)
    written = [tmp_path / "out", *(tmp_path / "out").iterdir()]
    assert {"model.safetensors", "masks.safetensors"} <= {p.name for p in written}
    for path in written:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


# --- 9: a local corpus makes no network request ---------------------------------------------
class RecordingProxy:
    """An HTTP(S) proxy on localhost that records each request's first line and answers nothing."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.requests.append(conn.recv(4096).split(b"\r\n")[0].decode(errors="replace"))


def _online_env(**extra: str) -> dict[str, str]:
    """The environment of a user who never set any offline switch (the tests' HF_HUB_OFFLINE removed)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))
        and k.lower() not in ("no_proxy", "https_proxy", "http_proxy")
    }
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _fit_and_prune(tmp_path: Path, corpus: Path, model_cache: Path) -> list[list[str]]:
    fit = [
        "fit",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"--model.model_cache_dir={model_cache}",
        f"--data.corpus={corpus}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--model.export_dir={tmp_path / 'sae'}",
        "--trainer.fast_dev_run=true",
    ]
    prune = [
        "prune",
        "--model=tiny-llama",
        "--method=wanda",
        "--sparsity=0.5",
        f"--corpus={corpus}",
        "--calibration_sequences=2",
        "--calibration_seq_len=32",
        "--eval_sequences=2",
        "--eval_seq_len=32",
        "--no_progress",
        f"--model_cache_dir={model_cache}",
        f"--cache_dir={tmp_path / 'cache'}",
        f"--output={tmp_path / 'pruned'}",
    ]
    return [fit, prune]


@pytest.mark.e2e
def test_fit_and_prune_on_a_local_corpus_make_no_network_request(tmp_path, local_corpus, model_cache):
    proxy = RecordingProxy()
    env = _online_env(
        HTTPS_PROXY=proxy.url, HTTP_PROXY=proxy.url, https_proxy=proxy.url, http_proxy=proxy.url
    )
    for args in _fit_and_prune(tmp_path, local_corpus, model_cache):
        result = subprocess.run(
            [sys.executable, "-m", "lit_prune", *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert proxy.requests == []
    assert (tmp_path / "sae" / "cfg.json").is_file() and (tmp_path / "pruned" / REPORT_FILE).is_file()


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-rn", "true"]).returncode == 0


@pytest.mark.e2e
@pytest.mark.skipif(
    not _unshare_works(), reason="`unshare -rn` (a user namespace without network) is not allowed here"
)
def test_fit_and_prune_on_a_local_corpus_run_without_any_network(tmp_path, local_corpus, model_cache):
    for args in _fit_and_prune(tmp_path, local_corpus, model_cache):
        result = subprocess.run(
            ["unshare", "-rn", sys.executable, "-m", "lit_prune", *args],
            cwd=tmp_path,
            env=_online_env(),
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "sae" / "cfg.json").is_file() and (tmp_path / "pruned" / REPORT_FILE).is_file()


def test_local_corpus_loader_leaves_the_hub_switches_as_they_were(local_corpus):
    import datasets

    from lit_prune.data.corpora import load_documents

    saved = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    assert sum(1 for _ in load_documents(str(local_corpus))) > 0
    assert (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS) == saved
