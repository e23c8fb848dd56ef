"""`python -m lit_prune prune` on tiny models: the saved directory reloads to exactly the pruned
weights, realised sparsity and perplexities are the real ones, calibration files reproduce the
masks, bad input is one line with exit 2 and no output, and --overwrite never loses an output."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_in_process, run_cli
from transformers import AutoModelForCausalLM

import lit_prune.pruning
from lit_prune import cli
from lit_prune.analysis.perplexity import perplexity
from lit_prune.commands.prune import MASKS_FILE, REPORT_FILE, PruneOptions, build_parser, run_prune
from lit_prune.data.tokens import pack_documents, tokens_fingerprint
from lit_prune.errors import LitPruneError
from lit_prune.lit.datamodule import TokenDataModule
from lit_prune.models.registry import load_model, load_tokenizer
from lit_prune.pruning import load_masks, prunable_linears, prune_model

SEQ, N_SEQ, EVAL = 32, 4, 4  # calibration windows and eval sequences: small enough for CPU tests
TEXT = "\n\n".join(f"def f{i}(x):\n    return x * {i}  # the value of f{i} at x" for i in range(60))


@pytest.fixture
def options(tmp_path, model_cache, local_corpus, data_cache):
    """Factory of PruneOptions for tiny models on the local corpus, writing into tmp_path/out."""

    def make(**kw) -> PruneOptions:
        base = dict(
            output=str(tmp_path / "out"),
            model="tiny-llama",
            corpus=str(local_corpus),
            sparsity=0.5,
            calibration_sequences=N_SEQ,
            calibration_seq_len=SEQ,
            eval_sequences=EVAL,
            batch_size=4,
            progress=False,
            model_cache_dir=str(model_cache),
            cache_dir=str(data_cache),
        )
        return PruneOptions(**{**base, **kw})

    return make


def as_argv(o: PruneOptions) -> list[str]:
    """The command line equivalent of `o` (None fields left out, booleans as flags)."""
    argv = []
    for key, value in vars(o).items():
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no_{key}")
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def eval_ids(o: PruneOptions) -> torch.Tensor:
    """The first eval_sequences x eval_seq_len tokens of a TokenDataModule's eval split on the same corpus."""
    n = o.eval_seq_len
    dm = TokenDataModule(
        model_name=o.model,
        corpus=o.corpus,
        seq_len=n,
        train_tokens=2 * n,
        eval_tokens=n * EVAL,
        calibration_sequences=0,
        model_cache_dir=o.model_cache_dir,
        cache_dir=o.cache_dir,
    )
    dm.prepare_data()
    dm.setup()
    return dm.eval_ids[:EVAL]


def expected_pruned(shape: tuple[int, int], sparsity: float, method: str) -> int:
    d_out, d_in = shape
    return d_out * math.floor(d_in * sparsity) if method == "wanda" else math.floor(d_out * d_in * sparsity)


def leftovers(parent: Path) -> list[str]:
    """Temp directories a failed or finished write might have left beside the output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".out-"))


@pytest.mark.parametrize(
    "model,method,sparsity,seq_len",
    [
        ("tiny-llama", "wanda", 0.3, 128),
        ("tiny-gemma2", "magnitude", 0.7, 128),
        ("tiny-gemma3", "wanda", 0.5, 48),
    ],
)
def test_output_reloads_to_the_pruned_model_with_true_report(options, model, method, sparsity, seq_len):
    o = options(model=model, method=method, sparsity=sparsity, eval_seq_len=seq_len)
    result = run_prune(o)
    out = Path(o.output)
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    live, reloaded = result.model.state_dict(), saved.state_dict()
    assert live.keys() == reloaded.keys()
    assert all(torch.equal(live[k], reloaded[k]) for k in live)
    masks = load_masks(out / MASKS_FILE)
    assert masks.keys() == result.masks.keys() == prunable_linears(saved).keys()
    report = result.report
    for row in report["layers"]:
        keep, weight = masks[row["name"]], prunable_linears(saved)[row["name"]].weight
        assert torch.equal(keep, result.masks[row["name"]].cpu())
        assert bool((weight[~keep] == 0).all())
        want = expected_pruned(tuple(weight.shape), sparsity, method)
        assert row["pruned"] == int((~keep).sum()) == want and row["sparsity"] == want / weight.numel()
    assert report["realised_sparsity"] == sum(r["pruned"] for r in report["layers"]) / report["prunable"]
    dense = load_model(model, cache_dir=o.model_cache_dir)
    assert torch.equal(dense.get_input_embeddings().weight, saved.get_input_embeddings().weight)
    ids = eval_ids(o)
    ppl = report["perplexity"]
    assert ppl["eval_tokens"] == ids.numel() == EVAL * seq_len and ppl[
        "eval_fingerprint"
    ] == tokens_fingerprint(ids)
    assert (ppl["eval_seq_len"], ppl["eval_predictions"]) == (seq_len, EVAL * (seq_len - 1))
    assert ppl["before"] == pytest.approx(perplexity(dense, ids, 4), rel=1e-9)
    assert ppl["after"] == pytest.approx(perplexity(saved, ids, 4), rel=1e-9)
    assert (report["method"], report["sparsity"]) == (method, sparsity)
    assert report["calibration"]["used"] == (method == "wanda")
    assert report["versions"]["torch"] == torch.__version__ and report["seconds"]["total"] > 0
    assert leftovers(out.parent) == []


def _write(kind: str, path: Path, tokenizer) -> tuple[Path, torch.Tensor]:
    """A calibration file of `kind` and the ids the command must take from it (N_SEQ x SEQ)."""
    rng = np.random.default_rng(0)
    if kind == "pt":  # 2-D, larger than needed: capped to N_SEQ rows and SEQ columns
        ids = torch.from_numpy(rng.integers(0, 512, (N_SEQ + 2, SEQ + 8)))
        torch.save(ids, path / "ids.pt")
        return path / "ids.pt", ids[:N_SEQ, :SEQ]
    if kind == "npy":  # 1-D: cut into windows of SEQ
        ids = rng.integers(0, 512, N_SEQ * SEQ + 5).astype(np.int32)
        np.save(path / "ids.npy", ids)
        return path / "ids.npy", torch.from_numpy(ids[: N_SEQ * SEQ].astype(np.int64)).view(N_SEQ, SEQ)
    (path / "calib.txt").write_text(TEXT)
    return path / "calib.txt", pack_documents([TEXT], tokenizer, SEQ, N_SEQ)


@pytest.mark.parametrize("kind,model", [("pt", "tiny-llama"), ("npy", "tiny-gemma2"), ("txt", "tiny-llama")])
def test_calibration_file_reproduces_masks(options, tmp_path, kind, model):
    o = options(model=model, method="wanda")
    path, ids = _write(kind, tmp_path, load_tokenizer(model, o.model_cache_dir))
    assert ids.shape == (N_SEQ, SEQ)
    report = run_prune(replace(o, calibration_file=str(path))).report
    fresh = load_model(model, cache_dir=o.model_cache_dir)
    masks = prune_model(
        fresh, "wanda", 0.5, calibration_ids=ids, batch_size=4, max_seq_len=SEQ, progress=False
    )
    saved = load_masks(Path(o.output) / MASKS_FILE)
    assert saved.keys() == masks.keys() and all(torch.equal(saved[k], masks[k]) for k in masks)
    calib = report["calibration"]
    assert calib["fingerprint"] == tokens_fingerprint(ids) and calib["source"] == f"file:{path}"
    assert (calib["sequences"], calib["seq_len"]) == (N_SEQ, SEQ)


@pytest.mark.parametrize(
    "method,extra",
    [
        ("magnitude", dict(nm="2:4", sparsity=None)),
        ("wanda", dict(nm="2:4")),
        ("magnitude", dict(group="global", sparsity=0.4)),
    ],
)
def test_nm_and_global_patterns(options, method, extra):
    result = run_prune(options(method=method, **extra))
    total = sum(r["numel"] for r in result.report["layers"])
    if "nm" in extra:
        assert result.report["nm"] == [2, 4] and result.report["sparsity"] == 0.5
        for keep in result.masks.values():
            assert bool(((~keep).reshape(-1, 4).sum(dim=1) == 2).all())
    else:
        assert result.report["pruned"] == math.floor(total * 0.4) and result.report["group"] == "global"


def _bad_ids(path: Path) -> str:
    torch.save(torch.tensor([[5, 7, 512, 3] * 10] * 4), path / "bad.pt")  # 512 = vocab size: out of range
    return str(path / "bad.pt")


def _file(name: str, content: bytes):
    def make(path: Path) -> str:
        (path / name).write_bytes(content)
        return str(path / name)

    return make


def _npy(array: np.ndarray, name: str):
    def make(path: Path) -> str:
        np.save(path / name, array)
        return str(path / name)

    return make


BAD = {
    "sparsity_one": (["--sparsity", "1.0"], "sparsity"),
    "sparsity_negative": (["--sparsity", "-0.1"], "sparsity"),
    "sparsity_not_a_number": (["--sparsity", "abc"], "sparsity"),
    "nm_n_not_below_m": (["--nm", "4:4"], "nm"),
    "nm_malformed": (["--nm", "2-4"], "nm"),
    "nm_contradicts_sparsity": (["--nm", "2:4", "--sparsity", "0.3"], "sparsity"),
    "nm_not_dividing_d_in": (["--method", "magnitude", "--nm", "2:3", "--sparsity", "0"], "nm"),
    "unknown_method": (["--method", "obs"], "method"),
    "unknown_device": (["--device", "tpu"], "device"),
    "malformed_device": (["--device", "cuda:x"], "device"),
    "gpu_not_there": (["--device", "cuda:99"], "device"),
    "wanda_group_matrix": (["--group", "matrix"], "group"),
    "zero_calibration_samples": (["--calibration_sequences", "0"], "calibration_sequences"),
    "eval_window_without_a_prediction": (["--eval_seq_len", "1"], "eval_seq_len"),
    "ids_out_of_vocab": ([_bad_ids], "calibration_file"),
    "missing_file": ([lambda p: str(p / "nope.pt")], "calibration_file"),
    "unreadable_pt": ([_file("junk.pt", b"not a torch file")], "calibration_file"),
    "not_utf8_text": ([_file("junk.txt", b"\xff\xfe\xfa" * 50)], "calibration_file"),
    "empty_text": ([_file("empty.txt", b"")], "calibration_file"),
    "blank_text": ([_file("blank.txt", b"\n \n")], "calibration_file"),
    "text_shorter_than_window": ([_file("short.txt", b"x = 1")], "calibration_file"),
    "empty_npy": ([_npy(np.zeros(0, np.int64), "empty.npy")], "calibration_file"),
    "float_npy": ([_npy(np.zeros((4, 32), np.float32), "float.npy")], "calibration_file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_no_output(options, tmp_path, capsys, case):
    args, field = BAD[case]
    if callable(args[0]):
        args = ["--calibration_file", args[0](tmp_path)]
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = as_argv(options()) + args  # later flags override the defaults
    assert cli.main(["prune", *argv]) == 2
    err = capsys.readouterr().err  # in-process, transformers' weight-loading bar may precede the error
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    assert (
        errors[0].startswith(f"error: {field}=")
        or errors[0].startswith("error: arguments: ")
        and f'"{field}"' in errors[0]
    ), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp dir


def test_unwritable_outputs_are_refused_before_pruning(options, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for output, extra in ((tmp_path / "a_file" / "out", []), (Path("."), ["--overwrite"])):
        assert cli.main(["prune", *as_argv(options(output=str(output))), *extra]) == 2
        assert (
            capsys.readouterr()
            .err.strip()
            .splitlines()[-1]
            .startswith(f"error: output='{output}' is invalid")
        )
    assert (tmp_path / "a_file").read_text() == "mine" and not list(tmp_path.glob(".*-old-*"))


def test_overwrite_replaces_only_after_the_new_output_is_complete(options, tmp_path, capsys, monkeypatch):
    o = options(method="magnitude")
    run_prune(o)
    out = Path(o.output)
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    unchanged = lambda: {p.name: p.read_bytes() for p in out.iterdir()} == snapshot  # noqa: E731

    capsys.readouterr()
    assert cli.main(["prune", *as_argv(options(method="magnitude", sparsity=0.7))]) == 2
    assert capsys.readouterr().err.startswith("error: output=") and unchanged()
    bad = as_argv(options(sparsity=0.7, overwrite=True, calibration_file=_bad_ids(tmp_path)))
    assert cli.main(["prune", *bad]) == 2 and unchanged()

    def disk_full(*_args, **_kw):
        raise OSError("No space left on device")

    monkeypatch.setattr(
        lit_prune.pruning, "save_masks", disk_full
    )  # fails half-way through writing the new output
    with pytest.raises(LitPruneError, match="No space"):  # one line naming the output (#25)
        run_prune(options(method="magnitude", sparsity=0.7, overwrite=True))
    assert unchanged() and leftovers(tmp_path) == []
    monkeypatch.undo()

    report = run_prune(options(method="magnitude", sparsity=0.7, overwrite=True)).report
    assert report["sparsity"] == 0.7 and not unchanged() and leftovers(tmp_path) == []
    assert json.loads((out / REPORT_FILE).read_text())["sparsity"] == 0.7


def test_help_explains_every_option():
    parser = build_parser()
    helps = {a.dest: a.help or "" for a in parser._actions}
    for name in PruneOptions.__dataclass_fields__:
        assert len(helps[name].split("(type:")[0].strip()) > 10, name


@pytest.mark.e2e
def test_cli_process_exit_code_and_one_line_stderr(tmp_path, model_cache):
    """A real process: exit status 2, the error as the only stderr line, nothing written."""
    result = run_cli(
        "prune",
        "--output",
        str(tmp_path / "out"),
        "--method",
        "magnitude",
        "--sparsity",
        "1.5",
        "--model",
        "tiny-llama",
        "--model_cache_dir",
        str(model_cache),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: sparsity=1.5 is invalid: expected a number in [0, 1)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "option, value",
    [
        ("--model", "nope"),
        # e2e: the python-docs corpus is built (minutes) before the unusable cache dir is met
        pytest.param("--cache_dir", "/proc/lit_prune", marks=pytest.mark.e2e),
        ("--model_cache_dir", "/proc/lit_prune"),
    ],
)
def test_errors_of_shared_code_name_prunes_own_option(tmp_path, model_cache, option, value):
    """The data module and the registry name fit's fields; prune's message names its own option."""
    args = [
        "prune",
        "--output",
        str(tmp_path / "out"),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--model",
        "tiny-llama",
        "--model_cache_dir",
        str(model_cache),
        option,
        value,
    ]
    code, stderr = cli_in_process(*args, cwd=tmp_path)
    assert code == 2 and stderr.splitlines()[-1].startswith(f"error: {option[2:]}={value!r} is invalid"), (
        stderr
    )
    assert not (tmp_path / "out").exists()
