"""Issue #25 for fit / validate: a pruned checkpoint is validated on its pruned LM, non-finite settings
and diverging fits stop with one line, config and I/O errors are one line naming the file, and the
exported weights get umask modes. Each error leaves earlier outputs byte for byte as they were."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import ROOT, cli_in_process

import lit_prune.lit.sae_module
from lit_prune.cli import lightning_cli

pytestmark = pytest.mark.e2e  # Lightning fits (in process): the end-to-end lane

WANDA50 = str(ROOT / "configs" / "pruning" / "wanda50.yaml")


def _args(command: str, tmp_path: Path, corpus: Path, model_cache: Path, *extra: str) -> list[str]:
    return [
        command,
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--model.model_name=tiny-llama",
        f"--model.model_cache_dir={model_cache}",
        f"--data.corpus={corpus}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        *extra,
    ]


def _one_error_line(stderr: str) -> str:
    """The error line, checked to be the only line of stderr that is not a library's progress bar."""
    lines = [line for line in stderr.strip().splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pruned_fit(tmp_path_factory, local_corpus, model_cache):
    """A tiny fit on a wanda-pruned LM: (its folder, checkpoint, exported record, the fit's module)."""
    tmp = tmp_path_factory.mktemp("pruned_fit")
    cli = lightning_cli(
        _args("fit", tmp, local_corpus, model_cache, "--config", WANDA50, f"--model.export_dir={tmp / 'sae'}")
    )
    ckpt = next(Path(cli.trainer.logger.log_dir).glob("checkpoints/*.ckpt"))
    return tmp, ckpt, json.loads((tmp / "sae" / "lit_prune.json").read_text()), cli.model


# --- 1: validate measures the pruned LM the checkpoint was trained on ------------------------
def test_validate_on_a_pruned_checkpoint_gives_the_fits_own_numbers(pruned_fit, local_corpus, model_cache):
    tmp, ckpt, record, _ = pruned_fit
    cli = lightning_cli(
        _args("validate", tmp, local_corpus, model_cache, "--config", WANDA50, f"--ckpt_path={ckpt}")
    )
    assert record["pruning"]["method"] == "wanda"
    assert cli.model.last_val == pytest.approx(record["metrics"], rel=1e-6, abs=1e-9)
    masks = torch.load(ckpt, weights_only=False)["callbacks"]
    (state,) = [v for k, v in masks.items() if "PruningCallback" in k]
    linear = dict(cli.model.lm.named_modules())
    for name, keep in state["masks"].items():  # the checkpoint's masks, exactly
        assert torch.equal(linear[name].weight.detach().cpu() != 0, keep), name


def test_validate_without_the_pruning_is_refused(pruned_fit, local_corpus, model_cache, tmp_path):
    tmp, ckpt, _, _ = pruned_fit
    before = _snapshot(tmp / "sae")
    code, stderr = cli_in_process(
        *_args("validate", tmp, local_corpus, model_cache, f"--ckpt_path={ckpt}"), cwd=tmp
    )
    line = _one_error_line(stderr)
    assert code == 2 and "--ckpt_path: its SAE was trained on method=wanda" in line and "dense LM" in line
    assert _snapshot(tmp / "sae") == before


# --- 3: non-finite settings and diverging fits ----------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  lr: .inf\n", "error: model.lr=inf is invalid: expected a finite number"),
        ("model:\n  decay_fraction: .nan\n", "error: model.decay_fraction=nan is invalid"),
        ("model:\n  norm_scale: -.inf\n", "error: model.norm_scale=-inf is invalid"),
        ("model:\n  sae:\n    k: .inf\n", "model.sae.k"),
        ("trainer:\n  gradient_clip_val: .inf\n", "error: trainer.gradient_clip_val=inf is invalid"),
        (
            "trainer:\n  callbacks:\n    - class_path: lit_prune.lit.callbacks.PruningCallback\n"
            "      init_args:\n        method: magnitude\n        sparsity: .nan\n",
            "error: trainer.callbacks.0.init_args.sparsity=nan is invalid: expected a finite number",
        ),
    ],
)
def test_non_finite_yaml_values_are_one_line_errors(tmp_path, local_corpus, model_cache, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    args = _args("fit", tmp_path, local_corpus, model_cache, "--config", str(config))
    code, stderr = cli_in_process(*args, f"--model.export_dir={tmp_path / 'sae'}", cwd=tmp_path)
    assert code == 2 and message in _one_error_line(stderr)
    assert not (tmp_path / "sae").exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "abc"])
def test_bad_float_on_the_command_line_is_one_line_not_a_usage(tmp_path, local_corpus, model_cache, value):
    args = _args("fit", tmp_path, local_corpus, model_cache, "--model.lr", value)
    code, stderr = cli_in_process(*args, cwd=tmp_path)
    assert code == 2 and "model.lr" in _one_error_line(stderr)


def test_a_diverging_fit_stops_naming_the_step_and_exports_nothing(pruned_fit, local_corpus, model_cache):
    tmp, _, _, _ = pruned_fit
    before = _snapshot(tmp / "sae")
    logs = tmp / "diverged_logs"
    args = _args(
        "fit", tmp, local_corpus, model_cache, "--model.lr=1e30", f"--model.export_dir={tmp / 'sae'}"
    )
    code, stderr = cli_in_process(*args, f"--trainer.logger.init_args.save_dir={logs}", cwd=tmp)
    line = _one_error_line(stderr)
    assert code == 2 and line.startswith("error: training diverged: the SAE's ") and "at SAE step " in line
    assert "model.lr=1e+30" in line
    assert _snapshot(tmp / "sae") == before  # the earlier export, byte for byte
    for ckpt in logs.rglob("*.ckpt"):  # a checkpoint written before the divergence holds finite weights
        state = torch.load(ckpt, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


# --- 6: I/O failures ------------------------------------------------------------------------
def test_missing_or_truncated_checkpoint_is_one_line(pruned_fit, local_corpus, model_cache, tmp_path):
    tmp, ckpt, _, _ = pruned_fit
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    for command in ("validate", "fit"):
        for path in (tmp_path / "missing.ckpt", truncated):
            args = _args(
                command, tmp_path, local_corpus, model_cache, "--config", WANDA50, f"--ckpt_path={path}"
            )
            code, stderr = cli_in_process(*args, cwd=tmp_path)
            assert code == 2 and _one_error_line(stderr).startswith(f"error: ckpt_path='{path}' is invalid")


@pytest.mark.parametrize("export_dir", ["/proc/lit_prune_sae", "/proc/lit_prune/sae"])
def test_unwritable_export_dir_is_refused_before_training(tmp_path, local_corpus, model_cache, export_dir):
    args = _args("fit", tmp_path, local_corpus, model_cache, f"--model.export_dir={export_dir}")
    code, stderr = cli_in_process(*args, cwd=tmp_path)
    line = _one_error_line(stderr)
    assert code == 2 and line.startswith(f"error: model.export_dir='{export_dir}' is invalid")
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before any training


def test_unwritable_logger_dir_is_one_line_naming_it(tmp_path, local_corpus, model_cache):
    args = _args("fit", tmp_path, local_corpus, model_cache, f"--model.export_dir={tmp_path / 'sae'}")
    code, stderr = cli_in_process(
        *args, "--trainer.logger.init_args.save_dir=/proc/lit_prune_logs", cwd=tmp_path
    )
    assert code == 2 and "/proc/lit_prune_logs" in _one_error_line(stderr)


def test_a_failed_export_keeps_the_trained_sae_in_its_checkpoint(
    tmp_path, local_corpus, model_cache, monkeypatch
):
    def disk_full(sae, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(lit_prune.lit.sae_module, "export_sae", disk_full)
    args = _args("fit", tmp_path, local_corpus, model_cache, f"--model.export_dir={tmp_path / 'sae'}")
    code, stderr = cli_in_process(*args, cwd=tmp_path)
    line = _one_error_line(stderr)
    assert code == 2 and "No space left on device" in line and "kept in the checkpoint " in line
    ckpt = Path(line.split("kept in the checkpoint ")[1])
    assert ckpt.is_file() and torch.load(ckpt, weights_only=False)["state_dict"]["tokens_trained"] > 0


# --- 7: config errors are one line naming the file ------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  lr: [1\n", "error: --config='{path}' is invalid: expected a readable YAML file ("),
        ("model:\n- lr: 1\n", "error: model=[{{'lr': 1}}] is invalid: expected a mapping"),
        ("study:\n- methods: [wanda]\n", "error: study=[{{'methods': ['wanda']}}] is invalid"),
        ("model:\n  sae: 4\n", "error: model.sae=4 is invalid: expected a mapping"),
        ("- 1\n- 2\n", "error: --config='{path}' is invalid: expected a YAML mapping of sections"),
        ("model:\n  no_such_option: 1\n", "no_such_option"),
        ("trainer:\n  max_epochs: many\n", "trainer.max_epochs"),
        (
            "",
            "error: --config='{path}' is invalid: expected a YAML mapping of sections (the file holds none)",
        ),
    ],
)
def test_config_errors_are_one_line(tmp_path, local_corpus, model_cache, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    for command in ("fit", "validate"):
        args = _args(command, tmp_path, local_corpus, model_cache, "--config", str(config))
        code, stderr = cli_in_process(*args, cwd=tmp_path)
        assert code == 2 and message.format(path=config) in _one_error_line(stderr)


# --- 8: umask modes -------------------------------------------------------------------------
def test_exported_sae_and_cached_models_get_umask_modes(tmp_path, local_corpus):
    old = os.umask(0o022)
    try:
        args = _args(
            "fit", tmp_path, local_corpus, tmp_path / "models", f"--model.export_dir={tmp_path / 'sae'}"
        )
        lightning_cli([*args, "--trainer.fast_dev_run=true"])
    finally:
        os.umask(old)
    written = [*(tmp_path / "sae").iterdir(), *(tmp_path / "models").rglob("*")]
    assert any(p.name == "sae_weights.safetensors" for p in written)
    assert any(p.name == "model.safetensors" for p in written)
    for path in written:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


# --- more bad inputs (beyond the list) ----------------------------------------------
@pytest.mark.parametrize(
    "option, message",
    [
        ("--model.hook_layer=9", "error: model.hook_layer=9 is invalid"),  # named as fit spells it
        ("--model.sae.k=0", "error: model.sae.k=0 is invalid"),
        ("--model.seed=-1", "error: model.seed=-1 is invalid"),  # was accepted
        (
            "--trainer.default_root_dir=/proc/lit_prune_root",
            "error: trainer.default_root_dir='/proc/lit_prune_root'",
        ),
    ],
)
def test_more_bad_options_are_one_line_before_any_work(tmp_path, local_corpus, model_cache, option, message):
    args = _args("fit", tmp_path, local_corpus, model_cache, f"--model.export_dir={tmp_path / 'sae'}", option)
    code, stderr = cli_in_process(*args, cwd=tmp_path)
    assert code == 2 and message in stderr.strip().splitlines()[-1]
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "sae").exists()


def test_a_logger_dir_that_is_a_file_is_refused_before_training(tmp_path, local_corpus, model_cache):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    args = _args("fit", tmp_path, local_corpus, model_cache, f"--trainer.logger.init_args.save_dir={a_file}")
    code, stderr = cli_in_process(*args, "--trainer.fast_dev_run=true", cwd=tmp_path)
    assert code == 2 and f"trainer.logger.init_args.save_dir='{a_file}' is invalid" in _one_error_line(stderr)
    assert a_file.read_text() == "mine"


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_checkpoint_of_another_model_is_one_line(pruned_fit, local_corpus, model_cache, tmp_path, command):
    _, ckpt, _, _ = pruned_fit
    args = _args(command, tmp_path, local_corpus, model_cache, "--config", WANDA50, f"--ckpt_path={ckpt}")
    code, stderr = cli_in_process(*args, "--model.model_name=tiny-gemma2", cwd=tmp_path)
    line = stderr.strip().splitlines()[-1]
    assert code == 2 and line.startswith(
        "error: --ckpt_path: the checkpoint's run has model_name='tiny-llama'"
    )
