"""Save and load SAEs in sae-lens' own format plus our provenance metadata.

A directory holds `cfg.json` + `sae_weights.safetensors` (loadable with
`sae_lens.SAE.load_from_disk`) and `lit_prune.json` (model, hook, pruning
condition, seed, tokens, corpus fingerprint, versions, normalisation scalar).
The exported SAE works on RAW activations: the training-time input scale `c`
is folded into the weights (W_enc * c, W_dec / c, b_dec / c), so cfg.json says
`normalize_activations: none`.

cfg.json's metadata is what sae-lens needs to run the SAE on its model by itself
(`LensMetadata`): `sae_lens.load_model(model_class_name, model_name)` loads the LM
(`AutoModelForCausalLM`, hooked by module name, so `hook_name` is the decoder block
`model.layers.<L>`, whose output is resid_post), and `ActivationsStore.from_sae`
reads `dataset_path`, `context_size`, `prepend_bos` and `seqpos_slice` (position 0,
the attention sink, is never an SAE input: docs/methods.md §2).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sae_lens import SAE
from sae_lens.saes.sae import TrainingSAE

from lit_prune.errors import LitPruneError, described, invalid
from lit_prune.files import staging_dir, umask_modes

METADATA_FILE = "lit_prune.json"
_PACKAGES = ("lit_prune", "torch", "transformers", "sae-lens", "lightning", "datasets")


def versions() -> dict[str, str]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


def hook_name(layer: int) -> str:
    """TransformerLens-style name of block `layer`'s resid_post, as sae-lens records it."""
    return f"blocks.{layer}.hook_resid_post"


def module_hook_name(layer: int) -> str:
    """sae-lens' name of the same point on a Hugging Face model (`HookedProxyLM` hooks modules by name)."""
    return f"model.layers.{layer}"


_HOOK_LAYER = re.compile(r"^(?:blocks\.(\d+)\.hook_resid_post|model\.layers\.(\d+))$")


def hook_layer_of(name: str | None) -> int | None:
    """The block whose resid_post a hook name reads (either spelling), None for other hooks."""
    found = _HOOK_LAYER.match(name or "")
    return None if found is None else int(found.group(1) or found.group(2))


@dataclass(frozen=True)
class LensMetadata:
    """The settings sae-lens reads from cfg.json's metadata to rebuild the SAE's inputs."""

    model_name: str
    """hub id (org/name) or absolute local model directory that `AutoModelForCausalLM` loads."""
    context_size: int
    """tokens per sequence the SAE was trained on (data.seq_len)."""
    prepend_bos: bool
    """whether each sequence started with the BOS token (data.prepend_bos)."""
    dataset_path: str | None
    """hub id or local directory `datasets.load_dataset` reads the training corpus from."""
    model_class_name: str = "AutoModelForCausalLM"
    """how sae-lens' `load_model` wraps the LM."""
    seqpos_slice: tuple[int | None, ...] = (1, None)
    """token positions that are SAE inputs: all but position 0 (docs/methods.md §2)."""


def check_export_target(path: str | Path, field: str = "export_dir") -> None:
    """An SAE may be exported to `path`: it is new, or an earlier export (which it replaces), never a
    file or a directory of other things, and its parent can be a directory."""
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not (path / "cfg.json").is_file()):
        raise invalid(
            field,
            str(path),
            "a new directory or an earlier SAE export (one with cfg.json), which is replaced",
        )
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise invalid(field, str(path), f"a path whose parent can be a directory ({parent} is a file)")


LENS_DATASET_DIR = "python-docs-dataset"


def lens_metadata(
    model_name: str,
    model_cache_dir: str | Path,
    corpus: str,
    cache_dir: str | Path,
    context_size: int,
    prepend_bos: bool,
) -> LensMetadata:
    """`LensMetadata` of a run on `model_name` (our name, path or hub id) and `corpus` (data.corpus)."""
    from lit_prune.models.registry import model_dir

    source = model_dir(model_name, model_cache_dir)
    local = Path(source)
    return LensMetadata(
        model_name=str(local.resolve()) if local.is_dir() else source,
        context_size=context_size,
        prepend_bos=prepend_bos,
        dataset_path=lens_dataset_path(corpus, cache_dir),
    )


def lens_dataset_path(corpus: str, cache_dir: str | Path) -> str | None:
    """What `datasets.load_dataset(path)` reads `corpus` from: a hub id, or a local directory. The
    embedded corpus gets a directory of its own holding a hard link to its cached JSONL (its folder
    also holds the metadata sidecar, which `load_dataset` would read as data). A single local file or
    a glob has no such name: None (pass `datasets.load_dataset("json", data_files=...)` instead)."""
    from lit_prune.data.corpora import HUB_PREFIX, PYTHON_DOCS, python_docs_path

    if corpus.startswith(HUB_PREFIX):
        return corpus[len(HUB_PREFIX) :]
    if corpus == PYTHON_DOCS:
        jsonl = python_docs_path(Path(cache_dir) / "corpora")
        folder = jsonl.parent / LENS_DATASET_DIR
        linked = folder / "train.jsonl"
        if not (linked.is_file() and linked.samefile(jsonl)):
            folder.mkdir(exist_ok=True)
            linked.unlink(missing_ok=True)
            try:
                os.link(jsonl, linked)
            except OSError:  # a file system without hard links: a copy
                shutil.copyfile(jsonl, linked)
        return str(folder.resolve())
    path = Path(corpus).expanduser()
    return str(path.resolve()) if path.is_dir() else None


def export_sae(
    sae: TrainingSAE,
    path: str | Path,
    norm_scale: float,
    metadata: dict[str, Any],
    lens: LensMetadata | None = None,
) -> Path:
    """Write the inference SAE (scale folded in) and metadata; replaces `path` only when complete, and
    only if it is an earlier export (`check_export_target`). With `lens`, cfg.json carries everything
    `ActivationsStore.from_sae` needs; without, only the model and hook names."""
    path = Path(path)
    check_export_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folded = copy.deepcopy(sae).cpu()
    folded.fold_activation_norm_scaling_factor(norm_scale)
    folded.cfg.metadata.model_name = metadata.get("model")
    folded.cfg.metadata.hook_name = module_hook_name(metadata["hook_layer"])
    folded.cfg.metadata.hook_name_transformer_lens = hook_name(metadata["hook_layer"])
    folded.cfg.normalize_activations = "none"  # the scale is folded into the weights
    for key, value in asdict(lens).items() if lens is not None else ():
        folded.cfg.metadata[key] = list(value) if isinstance(value, tuple) else value
    tmp = staging_dir(path.parent, f".{path.name}-")
    try:
        folded.save_inference_model(tmp)
        record = {**metadata, "norm_scale": norm_scale, "norm_scale_folded": True, "versions": versions()}
        (tmp / METADATA_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
        umask_modes(tmp)  # safetensors' save_file writes 0600
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


PRETRAINED_PREFIX = "sae-lens:"


def load_sae(path: str | Path, device: str = "cpu") -> tuple[SAE, dict[str, Any]]:
    """An SAE directory -> (inference SAE on raw activations, our metadata or {} for foreign SAEs).

    "sae-lens:<release>:<sae_id>" loads a pretrained SAE through sae-lens' registry instead
    (downloaded from the hub on first use), e.g.
    sae-lens:gemma-scope-2b-pt-res-canonical:layer_12/width_16k/canonical.
    """
    if str(path).startswith(PRETRAINED_PREFIX):
        return _load_pretrained(str(path), device), {}
    path = Path(path)
    if not (path / "cfg.json").is_file():
        raise invalid("sae_path", str(path), "a directory with an sae-lens cfg.json and safetensors weights")
    try:
        sae = SAE.load_from_disk(path, device=device)
    except Exception as err:  # sae-lens raises many types for corrupt files; report one line
        raise LitPruneError(
            f"sae_path={str(path)!r} is not a loadable sae-lens SAE ({described(err)})"
        ) from err
    meta_file = path / METADATA_FILE
    metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return sae, metadata


def pretrained_id(spec: str) -> tuple[str, str] | None:
    """(release, sae_id) of "sae-lens:<release>:<sae_id>"; None if either part is missing."""
    release, _, sae_id = spec[len(PRETRAINED_PREFIX) :].partition(":")
    return (release, sae_id) if release and sae_id else None


def _load_pretrained(spec: str, device: str) -> SAE:
    parts = pretrained_id(spec)
    if parts is None:
        raise invalid(
            "sae_path", spec, "sae-lens:<release>:<sae_id> (names from sae-lens' pretrained_saes.yaml)"
        )
    try:
        return SAE.from_pretrained(*parts, device=device)
    except Exception as err:  # unknown release / id, no network: one line
        raise LitPruneError(
            f"sae_path={spec!r} could not be loaded through sae-lens ({described(err)})"
        ) from err


def check_compatible(
    sae: SAE, metadata: dict[str, Any], d_model: int, layer: int, field: str = "reference_sae"
) -> None:
    """A reference SAE must read the same width and (when recorded) the same hook as the model run."""
    if sae.cfg.d_in != d_model:
        raise invalid(f"{field}.d_in", sae.cfg.d_in, f"the model's d_model={d_model}")
    recorded = metadata.get("hook_layer")
    if recorded is None:
        recorded_name = getattr(sae.cfg.metadata, "hook_name", None)
        if recorded_name and hook_layer_of(recorded_name) != layer:
            raise invalid(
                f"{field}.hook",
                recorded_name,
                f"{hook_name(layer)} or {module_hook_name(layer)} (the hooked block)",
            )
    elif recorded != layer:
        raise invalid(f"{field}.hook_layer", recorded, f"the hooked block {layer}")
