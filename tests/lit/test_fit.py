"""The Lightning layer end to end on tiny models: fit, export, DDP, configs, CLI errors."""

import copy
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from helpers import ROOT, cli_in_process, run_cli
from sae_lens import SAE

from lit_prune.cli import lightning_cli
from lit_prune.lit.sae_module import SAEModule
from lit_prune.sae.fast import fast_topk_training_forward

pytestmark = pytest.mark.e2e  # Lightning fits (in process): the end-to-end lane


def _fit_args(tmp_path, model, corpus, model_cache, *extra):
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"--model.model_name={model}",
        f"--model.model_cache_dir={model_cache}",
        f"--data.corpus={corpus}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--model.export_dir={tmp_path / 'sae'}",
        *extra,
    ]


def _fit_without_checkpoints(tmp_path, corpus, model_cache, *extra):
    """`fit` of the tiny Llama that writes no checkpoint, plus `extra` options: the LightningCLI."""
    args = _fit_args(
        tmp_path, "tiny-llama", corpus, model_cache, "--trainer.enable_checkpointing=false", *extra
    )
    return lightning_cli(args)


def test_fast_dev_run_each_architecture(tiny_dir, tmp_path, local_corpus, model_cache):
    cli = lightning_cli(
        _fit_args(tmp_path, tiny_dir, local_corpus, model_cache, "--trainer.fast_dev_run=true")
    )
    module = cli.model
    assert module.tokens_trained.item() > 0
    assert set(module.last_val) >= {"fvu", "l0", "ce_recovered", "kl_score", "delta_lm_loss", "dead_fraction"}
    assert module.last_val["l0"] == pytest.approx(8.0)  # TopK k = 8 fires exactly k latents per token
    sae = SAE.load_from_disk(tmp_path / "sae")
    assert sae.cfg.d_in == module.lm.config.hidden_size


def test_fit_trains_exports_and_checkpoint_round_trips(tmp_path, local_corpus, model_cache):
    cli = lightning_cli(_fit_args(tmp_path, "tiny-llama", local_corpus, model_cache))
    module, trainer = cli.model, cli.trainer
    meta = json.loads((tmp_path / "sae" / "lit_prune.json").read_text())
    assert meta["tokens_trained"] == int(module.tokens_trained) > 0
    assert meta["corpus"]["fingerprint"] == cli.datamodule.provenance["fingerprint"]
    assert meta["metrics"]["fvu"] < 1.0  # the SAE learned something on the eval split
    assert meta["hparams"]["lr"] == 0.001 and "export_dir" not in meta["hparams"]  # the record is in it
    # the exported SAE on raw activations equals the module's scaled pipeline
    sae = SAE.load_from_disk(tmp_path / "sae")
    x = module.harvest(cli.datamodule.eval_ids[:2])
    with torch.no_grad():
        torch.testing.assert_close(
            sae.decode(sae.encode(x)), module.encode_decode(x)[1], rtol=1e-4, atol=1e-4
        )
    ckpt = next(Path(trainer.logger.log_dir).glob("checkpoints/*.ckpt"))
    state = torch.load(ckpt, weights_only=False)
    assert not any(k.startswith("lm.") for k in state["state_dict"])  # the frozen LM is not checkpointed
    torch.testing.assert_close(state["state_dict"]["sae.W_dec"], module.sae.W_dec)
    assert state["state_dict"]["norm_scale"].item() == pytest.approx(meta["norm_scale"])


def test_every_shipped_config_parses():
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from lit_prune.lit.datamodule import TokenDataModule

    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    from lit_prune.study.config import StudySettings

    class ParseOnly(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:  # as lit_prune.cli: fit ignores the study section
            parser.add_class_arguments(StudySettings, "study")

        def instantiate_classes(self) -> None:  # parse and validate types without loading any model
            pass

    # recovery.yaml selects PrunedLMModule and smollm2_quick.yaml cuts the study, each on top of a model
    # config (their own tests parse them)
    configs = sorted(
        p for p in (ROOT / "configs").glob("*.yaml") if p.stem not in ("recovery", "smollm2_quick")
    )
    assert {p.stem for p in configs} >= {"smollm2", "llama", "gemma2", "gemma3", "tiny"}
    for path in configs:
        cli = ParseOnly(SAEModule, TokenDataModule, args=["--config", str(path)], run=False)
        assert cli.config.model.model_name, path
        assert cli.config.model.sae.architecture in ("topk", "batchtopk", "standard", "jumprelu")
    partial = sorted((ROOT / "configs").glob("*/*.yaml"))  # added on top of a model config
    assert {p.parent.name for p in partial} == {"pruning", "analysis"}
    for path in partial:
        cli = ParseOnly(
            SAEModule,
            TokenDataModule,
            run=False,
            args=["--config", str(ROOT / "configs" / "smollm2.yaml"), "--config", str(path)],
        )
        classes = [c.class_path for c in cli.config.trainer.callbacks]
        assert classes and all(c.startswith("lit_prune.lit.") for c in classes), path


def test_ddp_two_cpu_processes(tmp_path, local_corpus, model_cache):
    result = run_cli(
        *_fit_args(
            tmp_path,
            "tiny-llama",
            local_corpus,
            model_cache,
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
        ),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((tmp_path / "sae" / "lit_prune.json").read_text())
    assert meta["tokens_trained"] > 0 and meta["metrics"]["tokens"] > 0
    output = result.stdout + result.stderr  # Lightning's noise is silenced in both ranks
    assert "💡 Tip" not in output and "LeafSpec" not in output, output[-3000:]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.model_name=no-such-model", "model_name='no-such-model' is invalid"),
        ("--model.hook_layer=99", "hook_layer=99 is invalid: expected a block index in [0, 3]"),
        ("--model.sae.architecture=gated", "sae.architecture='gated' is invalid"),
        ("--data.corpus=/no/such/corpus", "corpus"),
        (
            "--trainer.precision=16-true",
            "trainer.precision='16-true' is invalid: expected 32-true or bf16-mixed",
        ),
        ("--model.norm_sequences=0", "model.norm_sequences=0 is invalid"),
        ("--model.warmup_steps=-5", "model.warmup_steps=-5 is invalid"),
        (
            "--model.sae_batch_tokens=100000",
            "model.sae_batch_tokens=100000 is invalid",
        ),  # no step would be taken
        ("--trainer.devices=0", "error: trainer settings: "),  # Lightning's refusal, in one line
        (
            "--trainer.strategy=foo",
            "error: trainer settings: You selected an invalid strategy name",
        ),  # a ValueError
        (
            "--trainer.devices=abc",
            "error: trainer settings: `devices` selected with `CPUAccelerator`",
        ),  # a TypeError
        (
            "--trainer.strategy=ddp_spawn",
            "error: trainer.strategy=\"DDPStrategy(start_method='spawn')\" is invalid",
        ),
        ("--seed_everything=-1", "error: seed_everything=-1 is invalid"),
        ("--data.cache_dir=/dev/null/cache", "error: data.cache_dir='/dev/null/cache' is invalid"),
        (
            "--model.model_cache_dir=/proc/lit_prune",
            "error: model.model_cache_dir='/proc/lit_prune' is invalid",
        ),
        ("--model.model_name=nope", "error: model.model_name='nope' is invalid"),  # named as fit spells it
        # a callback's own check, which jsonargparse wraps in a many-line error
        (
            "--trainer.callbacks+={class_path: lit_prune.lit.callbacks.PruningCallback, "
            "init_args: {method: magnitude, sparsity: 1.5}}",
            "error: sparsity=1.5 is invalid",
        ),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, local_corpus, model_cache, override, message):
    code, stderr = cli_in_process(
        *_fit_args(tmp_path, "tiny-llama", local_corpus, model_cache, override), cwd=tmp_path
    )
    assert code == 2
    assert message in stderr, stderr[-2000:]


def test_export_replaces_only_an_earlier_export_of_a_trained_sae(tmp_path, local_corpus, model_cache):
    from lit_prune.errors import LitPruneError

    def args(target, *extra):  # later flags override earlier ones: this export_dir wins
        return _fit_args(
            tmp_path,
            "tiny-llama",
            local_corpus,
            model_cache,
            "--trainer.enable_checkpointing=false",
            *extra,
            f"--model.export_dir={target}",
        )

    precious, a_file = tmp_path / "precious", tmp_path / "a_file"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    a_file.write_text("mine")
    for target in (precious, a_file, a_file / "sae"):
        with pytest.raises(LitPruneError, match="model.export_dir="):
            lightning_cli(args(target))
    assert (precious / "notes.txt").read_text() == "mine" and a_file.read_text() == "mine"
    lightning_cli(args(tmp_path / "sae"))
    good = (tmp_path / "sae" / "sae_weights.safetensors").read_bytes()
    cli = lightning_cli(args(tmp_path / "sae", "--trainer.max_epochs=0", "--model.seed=3"))  # trains nothing
    assert int(cli.model.tokens_trained) == 0
    assert (tmp_path / "sae" / "sae_weights.safetensors").read_bytes() == good
    assert json.loads((tmp_path / "sae" / "lit_prune.json").read_text())["seed"] == 0


def test_runs_without_a_logger_export_to_new_directories(tmp_path, local_corpus, model_cache):
    args = [
        a
        for a in _fit_args(
            tmp_path,
            "tiny-llama",
            local_corpus,
            model_cache,
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
        )
        if not a.startswith(("--model.export_dir", "--trainer.logger."))
    ]
    for seed in (0, 1):
        lightning_cli(args + [f"--model.seed={seed}"])
    seeds = [
        json.loads((tmp_path / "sae" / f"version_{n}" / "lit_prune.json").read_text())["seed"] for n in (0, 1)
    ]
    assert seeds == [0, 1]


def test_empty_corpus_is_one_line_error(tmp_path, model_cache):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, stderr = cli_in_process(*_fit_args(tmp_path, "tiny-llama", empty, model_cache), cwd=tmp_path)
    assert code == 2 and "corpus" in stderr.strip().splitlines()[-1]


def test_lr_schedule_spans_every_sae_step_not_lm_batches(tmp_path, local_corpus, model_cache):
    """Small SAE batches: ~4 SAE steps per LM batch; the warm-up/decay schedule must cover all of them."""
    from lit_prune.sae.schedule import sae_steps

    cli = _fit_without_checkpoints(tmp_path, local_corpus, model_cache, "--model.sae_batch_tokens=64")
    module, dm = cli.model, cli.datamodule
    taken = int(module.tokens_trained) // 64
    lm_batches = -(-dm.train_ids.shape[0] // dm.hparams.batch_size)
    assert taken > 3 * lm_batches
    assert abs(sae_steps(lm_batches, dm.hparams.batch_size * (dm.hparams.seq_len - 1), 64) - taken) <= 1
    factor = module.lr_schedulers().lr_lambdas[0]
    assert factor(taken // 2) == 1.0 and factor(taken - 2) > 0  # still training near the end


def test_fused_adam_step_equals_plain_adam(tmp_path, local_corpus, model_cache):
    """The module's fused Adam gives the update of the textbook (for-loop) Adam from the same state."""
    cli = _fit_without_checkpoints(tmp_path, local_corpus, model_cache)
    module = cli.model
    fused = module.optimizers().optimizer
    assert fused.defaults["fused"] is True
    fused.param_groups[0]["lr"] = 1e-3  # the schedule ended at 0
    ref_sae = copy.deepcopy(module.sae)
    plain = torch.optim.Adam(ref_sae.parameters(), lr=1e-3, foreach=False)
    plain.load_state_dict(copy.deepcopy(fused.state_dict()))  # moments and step counts (not aliased)
    plain.param_groups[0].update(fused=None, foreach=False)  # load_state_dict copied the flags too
    x = module.harvest(cli.datamodule.train_ids[:2]) * module.norm_scale.float()
    dead = module.tokens_since_fired > module.hparams.dead_window_tokens
    before = module.sae.W_enc.detach().clone()
    module.sae_step(x)
    assert not torch.equal(module.sae.W_enc, before)
    plain.zero_grad()
    fast_topk_training_forward(ref_sae, x, dead).loss.backward()
    plain.step()
    for name, value in ref_sae.named_parameters():
        torch.testing.assert_close(getattr(module.sae, name), value, rtol=1e-5, atol=1e-6)


def test_training_scalars_one_point_per_sae_step(tmp_path, local_corpus, model_cache):
    """Written log_every_n_steps at a time, yet every SAE step has its point, at its step, with its values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = _fit_without_checkpoints(
        tmp_path, local_corpus, model_cache, "--model.sae_batch_tokens=64", "--trainer.log_every_n_steps=3"
    )
    module = cli.model
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    points = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith("train/")
    }
    steps = list(range(1, module.global_step + 1))
    assert module.global_step % 3 != 0  # some points were still pending when training ended
    assert {tag: [s for s, _ in p] for tag, p in points.items()} == {tag: steps for tag in points}
    tokens = [v for _, v in points["train/tokens"]]
    assert tokens[-1] == module.tokens_trained.item()
    assert all(0 < b - a <= 64 for a, b in zip([0.0, *tokens], tokens, strict=False))
    factor = module.lr_schedulers().lr_lambdas[0]
    assert [v for _, v in points["train/lr"]] == pytest.approx([module.hparams.lr * factor(s) for s in steps])
    parts = [
        a + b
        for (_, a), (_, b) in zip(
            points["train/mse_loss"], points["train/auxiliary_reconstruction_loss"], strict=False
        )
    ]
    assert [v for _, v in points["train/loss"]] == pytest.approx(parts, rel=1e-6)


def test_bf16_mixed_runs_the_lm_under_autocast_and_the_sae_in_fp32(
    tmp_path, local_corpus, model_cache, monkeypatch
):
    """trainer.precision=bf16-mixed: Lightning's autocast covers the training and validation steps; the LM
    forward uses it, the SAE step, its state and the metrics do not."""
    import lit_prune.lit.sae_module as sae_module

    seen: dict[str, set] = {"harvest": set(), "step": set(), "loss": set(), "codec": set()}
    real_harvest, real_step, real_codec = (
        sae_module.harvest,
        sae_module.fast_topk_training_forward,
        sae_module.sae_codec,
    )

    def harvest(lm, ids, layer):
        seen["harvest"].add(torch.is_autocast_enabled("cpu"))
        return real_harvest(lm, ids, layer)

    def step(sae, x, dead=None, **kwargs):
        seen["step"].add(torch.is_autocast_enabled("cpu"))
        out = real_step(sae, x, dead, **kwargs)
        seen["loss"].add(out.loss.dtype)
        return out

    def codec(sae, scale):
        run = real_codec(sae, scale)
        return lambda x: (seen["codec"].add(torch.is_autocast_enabled("cpu")), run(x))[1]

    for name, spy in (("harvest", harvest), ("fast_topk_training_forward", step), ("sae_codec", codec)):
        monkeypatch.setattr(sae_module, name, spy)
    cli = _fit_without_checkpoints(tmp_path, local_corpus, model_cache, "--trainer.precision=bf16-mixed")
    module = cli.model
    assert seen == {"harvest": {True, False}, "step": {False}, "loss": {torch.float32}, "codec": {False}}
    # (False: the norm scale is fitted in on_fit_start, outside the steps' autocast)
    assert {t.dtype for t in [*module.sae.parameters(), module.tokens_since_fired]} == {torch.float32}
    assert module.norm_scale.dtype == torch.float64 and module.tokens_trained.item() > 0
    assert all(math.isfinite(v) for v in module.last_val.values()) and module.last_val["fvu"] < 1.0
    assert SAE.load_from_disk(tmp_path / "sae").W_dec.dtype == torch.float32


def test_ctrl_c_during_training_exits_130_and_exports_nothing(
    tmp_path, local_corpus, model_cache, monkeypatch
):
    """Lightning turns the KeyboardInterrupt into its own exit(1) after a graceful shutdown; the
    command still reports it as an interruption, with the shell's status for SIGINT."""

    def interrupted(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(SAEModule, "training_step", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    try:
        code, stderr = cli_in_process(
            *_fit_args(tmp_path, "tiny-llama", local_corpus, model_cache), cwd=tmp_path
        )
    finally:  # Lightning ignores SIGINT from its shutdown on; this process's later tests need it back
        signal.signal(signal.SIGINT, handler)
    assert code == 130 and stderr.strip().splitlines()[-1] == "interrupted", stderr[-2000:]
    assert not (tmp_path / "sae").exists()


@pytest.mark.parametrize("command", ["prnue", "test", "predict"])  # a typo; Lightning's steps an SAE lacks
def test_unknown_command_is_one_line_error_naming_every_command(tmp_path, command):
    code, stderr = cli_in_process(command, cwd=tmp_path)
    assert (code, stderr) == (
        2,
        f"error: command='{command}' is invalid: expected one of "
        "fit, validate, prune, study, report, export\n",
    )


def test_top_level_help_names_every_command(tmp_path, capsys):
    from lit_prune.cli import EXTRA_COMMANDS, LIGHTNING_COMMANDS

    code, _ = cli_in_process("--help", cwd=tmp_path)
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("usage: python -m lit_prune <command> [options]")
    listed = out.split("commands:\n")[1].split("\n\n")[0]
    assert [line.split()[0] for line in listed.splitlines()] == [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS]


def test_misspelt_and_abbreviated_options_are_one_line_errors_naming_the_option(tmp_path):
    code, err = cli_in_process("fit", "--model.learning_rate", "1", cwd=tmp_path)
    assert (code, err) == (2, "error: unknown option --model.learning_rate: did you mean --model.lr?\n")
    code, err = cli_in_process("fit", "--trainer.max_epoch", "2", cwd=tmp_path)  # no silent abbreviation
    assert (code, err) == (
        2,
        "error: unknown option --trainer.max_epoch: did you mean --trainer.max_epochs?\n",
    )


def test_fit_help_shows_fit_options_only(tmp_path, capsys):
    code, _ = cli_in_process("fit", "--help", cwd=tmp_path)  # lit_prune/help.json: tests/test_cli_help.py
    out = capsys.readouterr().out
    assert code == 0 and "--model.lr" in out and "--study" not in out
