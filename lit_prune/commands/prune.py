"""`python -m lit_prune prune`: prune a causal LM and write a loadable model directory with masks and a report.

The options, their parser and the output directory's layout: lit_prune.commands.prune_options.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from lit_prune.commands.prune_options import PruneOptions, parse_options
from lit_prune.commands.prune_options import build_parser as build_parser  # re-exported
from lit_prune.errors import LitPruneError, invalid
from lit_prune.files import check_writable, staging_dir, umask_modes

if TYPE_CHECKING:  # annotations only: `prune --help` imports no torch
    import torch
    from torch import nn
    from transformers import PreTrainedModel

MASKS_FILE = "masks.safetensors"
REPORT_FILE = "prune_report.json"
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass
class PruneResult:
    """What `run_prune` produced: the in-memory pruned model, its keep-masks and the written report."""

    output: Path
    model: nn.Module
    masks: dict[str, torch.Tensor]
    report: dict[str, Any]


def parse_nm(nm: str | None) -> tuple[int, int] | None:
    """`"N:M"` -> (N, M) with 1 <= N < M; None stays None."""
    if nm is None:
        return None
    match = _NM.match(str(nm))
    if not match or not 1 <= int(match[1]) < int(match[2]):
        raise invalid("nm", nm, "N:M with integers 1 <= N < M, e.g. 2:4")
    return int(match[1]), int(match[2])


def check_options(o: PruneOptions) -> tuple[float, tuple[int, int] | None, str, torch.device]:
    """Validate everything that needs no model: returns (sparsity, nm, group, device) as pruning will use them."""
    from lit_prune.models.registry import resolve_device
    from lit_prune.pruning import CALIBRATED, METHODS, resolve_group, resolve_sparsity
    from lit_prune.pruning.sparsegpt import check_options as check_sparsegpt

    device = resolve_device(o.device)
    if o.method not in METHODS:
        raise invalid("method", o.method, "one of " + ", ".join(METHODS))
    sparsity, nm = resolve_sparsity(o.sparsity, parse_nm(o.nm))
    group = resolve_group(o.method, o.group, nm)
    minimum = {
        "calibration_seq_len": 2,
        "eval_sequences": 1,
        "eval_seq_len": 2,
        "batch_size": 1,
        "calibration_sequences": 0,
    }
    for name, low in minimum.items():
        value = getattr(o, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise invalid(name, value, f"an integer >= {low}")
    if o.method in CALIBRATED and o.calibration_sequences == 0:
        raise invalid(
            "calibration_sequences", 0, f"an integer >= 1 for {o.method} (it needs calibration samples)"
        )
    if o.method == "sparsegpt":
        check_sparsegpt(sparsity, nm, o.dampening, o.column_block)
    check_output(Path(o.output), o.overwrite)
    if o.calibration_file is not None:
        path = Path(o.calibration_file)
        if not path.is_file():
            raise invalid("calibration_file", o.calibration_file, "an existing file")
        if path.stat().st_size == 0:
            raise invalid("calibration_file", o.calibration_file, "a non-empty file")
    return sparsity, nm, group, device


def check_output(output: Path, overwrite: bool) -> None:
    """An existing output is an error unless `overwrite`; so is one that could never be written."""
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise invalid(
            "output", str(output), "a path that does not exist yet (or pass --overwrite to replace it)"
        )
    if not str(output).strip() or output.resolve() == Path.cwd().resolve():
        raise invalid(
            "output", str(output), "a directory other than the current one (it is replaced as a whole)"
        )
    if output.exists() or output.is_symlink():
        check_earlier_output(output)
    check_writable("output", output.parent, str(output))  # tried, not read from mode bits (root, /proc)


def check_earlier_output(output: Path) -> None:
    """--overwrite replaces only an earlier `prune` output: a folder holding its report and masks and
    nothing that report does not list, never a plain file, a link or a folder of other things."""
    report = output / REPORT_FILE
    if (
        output.is_symlink()
        or not output.is_dir()
        or not (report.is_file() and (output / MASKS_FILE).is_file())
    ):
        raise invalid("output", str(output), f"a new path or an earlier prune output (with {REPORT_FILE})")
    try:
        listed = json.loads(report.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    foreign = sorted(
        e.name
        for e in os.scandir(output)
        if not e.is_file(follow_symlinks=False) or (listed is not None and e.name not in listed)
    )
    if foreign:
        raise invalid(
            "output",
            str(output),
            "a new path or an earlier prune output holding only what prune wrote "
            f"(not {', '.join(foreign[:3])})",
        )


def load_splits(o: PruneOptions, calibration: bool):
    """The TokenDataModule's eval split (seq_len 128) and, if asked, its calibration sample."""
    from lit_prune.lit.datamodule import TokenDataModule

    dm = TokenDataModule(
        model_name=o.model,
        corpus=o.corpus,
        seq_len=o.eval_seq_len,
        batch_size=o.batch_size,
        train_tokens=o.eval_seq_len,  # the train split is not used here
        eval_tokens=o.eval_sequences * o.eval_seq_len,
        calibration_sequences=o.calibration_sequences if calibration else 0,
        calibration_seq_len=o.calibration_seq_len,
        shuffle_seed=o.seed,
        cache_dir=o.cache_dir,
        model_cache_dir=o.model_cache_dir,
    )
    dm.prepare_data()
    dm.setup()
    if calibration and dm.calibration_ids.shape[0] == 0:
        window = f"a corpus whose calibration split holds a {o.calibration_seq_len}-token window"
        raise invalid("corpus", o.corpus, window)
    return dm


def calibration_record(ids: torch.Tensor | None, source: str | None, seed: int) -> dict[str, Any]:
    """The report's account of the calibration ids actually used (None: the method used no data)."""
    from lit_prune.data.tokens import tokens_fingerprint

    shape = tuple(ids.shape) if ids is not None else (0, 0)
    return {
        "used": ids is not None,
        "source": source,
        "seed": seed,
        "sequences": shape[0],
        "seq_len": shape[1],
        "tokens": shape[0] * shape[1],
        "fingerprint": tokens_fingerprint(ids) if ids is not None else None,
    }


def run_prune(o: PruneOptions) -> PruneResult:
    """Validate, load, measure, prune, measure again and write the output directory."""
    from lit_prune.analysis.perplexity import perplexity
    from lit_prune.data.calibration_file import read_calibration_file
    from lit_prune.data.tokens import tokens_fingerprint
    from lit_prune.models.registry import load_model, load_tokenizer, model_dir
    from lit_prune.pruning import CALIBRATED, check_nm_shape, prunable_linears, prune_model, verify_masks

    start = time.perf_counter()
    sparsity, nm, group, device = check_options(o)
    tokenizer = load_tokenizer(o.model, o.model_cache_dir)
    # transformers' typing of PreTrainedModel.to rejects a torch.device
    model = load_model(o.model, cache_dir=o.model_cache_dir).to(device)  # pyright: ignore[reportArgumentType]
    if nm is not None:  # M must divide every d_in: fail before any expensive work
        for name, linear in prunable_linears(model).items():
            check_nm_shape(nm, tuple(linear.weight.shape), name)
    t = time.perf_counter()
    vocab = cast(int, model.get_input_embeddings().num_embeddings)
    file_ids = (
        None
        if o.calibration_file is None
        else read_calibration_file(
            Path(o.calibration_file), tokenizer, o.calibration_sequences, o.calibration_seq_len, vocab
        )
    )
    calibrated = o.method in CALIBRATED  # magnitude uses no data: a given file is validated, then ignored
    dm = load_splits(o, calibration=calibrated and file_ids is None)
    calibration_ids = (file_ids if file_ids is not None else dm.calibration_ids) if calibrated else None
    data_seconds = time.perf_counter() - t
    eval_ids = dm.eval_ids[: o.eval_sequences]
    before = perplexity(model, eval_ids, o.batch_size, o.progress)
    t = time.perf_counter()
    masks = prune_model(
        model,
        o.method,
        o.sparsity,
        nm,
        o.group,
        calibration_ids,
        o.batch_size,
        o.calibration_seq_len,
        o.progress,
        o.dampening,
        o.column_block,
    )
    prune_seconds = time.perf_counter() - t
    layers = verify_masks(model, masks, o.method, o.sparsity, nm, o.group)
    after = perplexity(model, eval_ids, o.batch_size, o.progress)
    pruned, numel = sum(r["pruned"] for r in layers), sum(r["numel"] for r in layers)
    report: dict[str, Any] = {
        "model": o.model,
        "model_source": model_dir(o.model, o.model_cache_dir),
        "method": o.method,
        "sparsity": sparsity,
        "requested_sparsity": o.sparsity,
        "nm": list(nm) if nm else None,
        "group": group,
        "realised_sparsity": pruned / numel,
        "pruned": pruned,
        "prunable": numel,
        "layers": layers,
        "perplexity": {
            "before": before,
            "after": after,
            "eval_sequences": int(eval_ids.shape[0]),
            "eval_seq_len": o.eval_seq_len,
            "eval_tokens": int(eval_ids.numel()),
            "eval_predictions": int(eval_ids.shape[0] * (o.eval_seq_len - 1)),
            "eval_fingerprint": tokens_fingerprint(eval_ids),
        },
        "calibration": calibration_record(
            calibration_ids,
            None
            if calibration_ids is None
            else f"file:{o.calibration_file}"
            if file_ids is not None
            else f"corpus:{o.corpus}:calibration",
            o.seed,
        ),
        "corpus": dm.provenance,
        "seconds": {"calibration_data": data_seconds, "calibration_and_pruning": prune_seconds},
        "options": asdict(o),
    }
    from lit_prune.sae.io import versions

    report["versions"] = versions()
    write_output(Path(o.output), model, tokenizer, masks, report, o.overwrite, start)
    return PruneResult(Path(o.output), model, masks, report)


def write_output(
    output: Path,
    model: PreTrainedModel,
    tokenizer,
    masks: dict[str, torch.Tensor],
    report: dict[str, Any],
    overwrite: bool,
    start: float,
) -> None:
    """Write everything into a temp dir beside `output`, then move it into place (old output kept until then)."""
    from lit_prune.pruning import save_masks

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(output.parent, f".{output.name}-new-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {k: json.dumps(report[k]) for k in ("model", "method", "sparsity", "nm", "group")}
        save_masks(masks, tmp / MASKS_FILE, metadata=meta)
        report["seconds"]["total"] = time.perf_counter() - start
        # what a later --overwrite may replace
        report["files"] = sorted([*(p.name for p in tmp.iterdir()), REPORT_FILE])
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
        umask_modes(tmp)  # save_pretrained and save_masks write 0600
        _publish(tmp, output, overwrite)
    except OSError as err:  # a full disk, a folder made read-only meanwhile: one line, the old output kept
        where = err.filename or output
        raise LitPruneError(
            f"output={str(output)!r}: could not be written ({where}: {err.strerror or err})"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, output: Path, overwrite: bool) -> None:
    """Rename `tmp` to `output`; an existing output is moved aside first and deleted only after the swap."""
    check_output(output, overwrite)
    if not (output.exists() or output.is_symlink()):
        os.rename(tmp, output)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}-old-", dir=output.parent)) / "old"
    os.rename(output, old)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)
        old.parent.rmdir()
        raise
    shutil.rmtree(old.parent, ignore_errors=True)


def main(argv: list[str]) -> int:
    """Entry point of `python -m lit_prune prune ARGS`; bad input raises LitPruneError (exit 2)."""
    result = run_prune(parse_options(argv))
    r, ppl = result.report, result.report["perplexity"]
    pattern = f" {r['nm'][0]}:{r['nm'][1]}" if r["nm"] else ""
    print(
        f"{r['method']}{pattern} sparsity {r['sparsity']:g}: realised {r['realised_sparsity']:.4f}, perplexity "
        f"{ppl['before']:.3f} -> {ppl['after']:.3f} on {ppl['eval_tokens']} eval tokens; wrote {result.output}"
    )
    return 0
