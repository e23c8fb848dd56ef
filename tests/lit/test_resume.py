"""fit --ckpt_path: a resumed run continues the checkpoint's run, or says why it cannot."""

import json

import pytest
from helpers import ROOT, cli_in_process

from lit_prune.cli import lightning_cli
from lit_prune.errors import LitPruneError
from lit_prune.lit.sae_module import check_resumed_settings, check_same_pruning

pytestmark = pytest.mark.e2e  # Lightning fits (in process): the end-to-end lane

WANDA = ROOT / "configs" / "pruning" / "wanda50.yaml"


def test_settings_that_contradict_the_checkpoint_are_named_with_both_values():
    saved = {"lr": 0.001, "sae": {"k": 8, "fast": None}, "export_dir": "a", "model_cache_dir": "m"}
    check_resumed_settings(
        {**saved, "export_dir": "b", "model_cache_dir": "n", "sae": {"k": 8, "fast": False}}, saved
    )
    with pytest.raises(
        LitPruneError,
        match=r"^--ckpt_path: the checkpoint's run has lr=0.001, sae.k=8, not "
        r"model.lr=0.01, model.sae.k=4; a resumed run keeps its settings",
    ):
        check_resumed_settings({**saved, "lr": 0.01, "sae": {"k": 4, "fast": None}}, saved)


def test_auto_lm_dtype_is_compared_as_what_it_chose(monkeypatch):
    from lit_prune.models import registry

    monkeypatch.setattr(registry.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(registry, "cpu_has_bf16", lambda: True)
    check_resumed_settings({"lm_dtype": "auto"}, {"lm_dtype": "bfloat16"})  # what auto chooses here
    with pytest.raises(LitPruneError, match=r"has lm_dtype='float32', not model.lm_dtype='bfloat16'"):
        check_resumed_settings({"lm_dtype": "auto"}, {"lm_dtype": "float32"})


def test_pruning_must_match_the_checkpoint():
    wanda = {"method": "wanda", "sparsity": 0.5, "nm": (2, 4), "group": None}
    check_same_pruning(wanda, {**wanda, "nm": [2, 4], "realised_sparsity": 0.5})  # tuple or list, extra keys
    with pytest.raises(
        LitPruneError, match="trained on the dense LM, this run's LM is method=wanda, sparsity=0.5, nm"
    ):
        check_same_pruning({"method": "dense", "sparsity": 0.0}, wanda)
    with pytest.raises(
        LitPruneError,
        match="trained on method=wanda, sparsity=0.5, nm=.2, 4., this run's LM is "
        "method=wanda, sparsity=0.25",
    ):
        check_same_pruning(wanda, {"method": "wanda", "sparsity": 0.25})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, local_corpus, model_cache):
    """A dense and a Wanda-pruned one-epoch fit: (fit arguments, dense checkpoint, pruned checkpoint)."""
    tmp = tmp_path_factory.mktemp("resume")
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"--model.model_cache_dir={model_cache}",
        f"--data.corpus={local_corpus}",
        f"--data.cache_dir={tmp / 'cache'}",
        "--data.train_tokens=2048",
        f"--trainer.logger.init_args.save_dir={tmp / 'logs'}",
    ]
    found = []
    for name, extra in (
        ("dense", []),
        ("wanda", ["--config", str(WANDA), "--trainer.callbacks.init_args.perplexity_sequences=0"]),
    ):
        cli = lightning_cli([*args, *extra, f"--model.export_dir={tmp / name}"])
        found.append(
            next((tmp / "logs").glob(f"tiny/version_{cli.trainer.logger.version}/checkpoints/*.ckpt"))
        )
    return args, *found


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.lr=0.01"], "the checkpoint's run has lr=0.001, not model.lr=0.01"),
        (["--config", str(WANDA)], "its SAE was trained on the dense LM, this run's LM is method=wanda"),
    ],
)
def test_a_contradicting_resume_of_the_dense_fit_is_one_line_error(checkpoints, tmp_path, extra, message):
    args, dense, _ = checkpoints
    code, stderr = cli_in_process(
        *args,
        *extra,
        "--trainer.max_epochs=2",
        f"--ckpt_path={dense}",
        f"--model.export_dir={tmp_path / 'sae'}",
        cwd=tmp_path,
    )
    assert code == 2 and message in stderr, stderr[-2000:]
    assert not (tmp_path / "sae").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "its SAE was trained on method=wanda, sparsity=0.5, this run's LM is the dense LM"),
        (
            ["--config", str(WANDA), "--trainer.callbacks.init_args.sparsity=0.25"],
            "this run's LM is method=wanda, sparsity=0.25",
        ),
    ],
)
def test_a_contradicting_resume_of_the_pruned_fit_is_one_line_error(checkpoints, tmp_path, extra, message):
    args, _, pruned = checkpoints
    code, stderr = cli_in_process(
        *args, *extra, "--trainer.max_epochs=2", f"--ckpt_path={pruned}", cwd=tmp_path
    )
    assert code == 2 and message in stderr, stderr[-2000:]


def test_a_resume_continues_the_run_and_exports_where_this_run_says(checkpoints, tmp_path):
    args, _, pruned = checkpoints
    first = json.loads((pruned.parents[3].parent / "wanda" / "lit_prune.json").read_text())
    cli = lightning_cli(
        [
            *args,
            "--config",
            str(WANDA),
            "--trainer.callbacks.init_args.perplexity_sequences=0",
            "--trainer.max_epochs=2",
            f"--ckpt_path={pruned}",
            f"--model.export_dir={tmp_path / 'sae'}",
        ]
    )
    meta = json.loads((tmp_path / "sae" / "lit_prune.json").read_text())
    assert cli.trainer.current_epoch == 2
    assert meta["tokens_trained"] == 2 * first["tokens_trained"]
    assert meta["pruning"]["method"] == "wanda" and meta["pruning"]["sparsity"] == 0.5
