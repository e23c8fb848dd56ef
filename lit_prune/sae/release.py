"""Exported SAEs -> a release folder in the layout of sae-lens' pretrained registry and Neuronpedia.

<out>/<sae_id>/cfg.json + sae_weights.safetensors (+ our lit_prune.json) per SAE, a README.md model
card (Hugging Face front matter, library saelens) and pretrained_saes.yaml: the entry to add to
sae-lens' registry once the folder is uploaded as the hub repo `repo_id`, after which
`SAE.from_pretrained(release, sae_id)` loads each SAE.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_prune.errors import invalid
from lit_prune.files import staging_dir

_WEIGHTS = ("cfg.json", "sae_weights.safetensors")
_OPTIONAL = ("lit_prune.json", "sparsity.safetensors")


@dataclass(frozen=True)
class ReleaseEntry:
    """One SAE of a release: where it comes from and the id sae-lens names it by."""

    source: Path
    """an SAE folder written by fit or a study (cfg.json + sae_weights.safetensors)."""
    sae_id: str
    """its id in the release, also its folder (e.g. layer_3/magnitude_0.5/seed_0)."""
    cfg: dict[str, Any]
    """its cfg.json."""
    record: dict[str, Any]
    """its lit_prune.json ({} for a foreign SAE)."""


def default_sae_id(record: dict[str, Any], cfg: dict[str, Any]) -> str:
    """layer_<L>/<dense | method_sparsity[_N:M]>/seed_<s>, from our record (or the cfg's hook)."""
    layer = record.get("hook_layer", cfg.get("metadata", {}).get("hook_name", "hook"))
    pruning = record.get("pruning") or {}
    method = pruning.get("method", "dense")
    condition = method if method == "dense" else f"{method}_{pruning.get('sparsity', 0.0):g}"
    if pruning.get("nm"):
        condition += "_{}of{}".format(*pruning["nm"])
    return f"layer_{layer}/{condition}/seed_{record.get('seed', 0)}"


def read_entry(source: str | Path, sae_id: str | None = None) -> ReleaseEntry:
    source = Path(source)
    missing = [name for name in _WEIGHTS if not (source / name).is_file()]
    if missing:
        raise invalid("sae_dirs", str(source), f"an exported SAE folder (it lacks {', '.join(missing)})")
    cfg = json.loads((source / "cfg.json").read_text())
    record_file = source / "lit_prune.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    return ReleaseEntry(source, sae_id or default_sae_id(record, cfg), cfg, record)


def write_release(
    entries: list[ReleaseEntry], out: str | Path, release: str, repo_id: str, neuronpedia_model: str | None
) -> Path:
    """Write the release folder `out` (replacing an earlier release there only once complete)."""
    ids = [e.sae_id for e in entries]
    if len(set(ids)) != len(ids):
        raise invalid("sae_ids", ids, "one distinct id per SAE (give --sae_ids)")
    out = Path(out)
    if out.exists() and not (out / "pretrained_saes.yaml").is_file():
        raise invalid("out", str(out), "a new folder or an earlier release (one with pretrained_saes.yaml)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out.parent, f".{out.name}-")
    try:
        for entry in entries:
            target = tmp / entry.sae_id
            target.mkdir(parents=True)
            for name in (*_WEIGHTS, *_OPTIONAL):
                if (entry.source / name).is_file():
                    shutil.copyfile(entry.source / name, target / name)
        (tmp / "pretrained_saes.yaml").write_text(registry_yaml(entries, release, repo_id, neuronpedia_model))
        (tmp / "README.md").write_text(model_card(entries, release, repo_id))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def registry_yaml(
    entries: list[ReleaseEntry], release: str, repo_id: str, neuronpedia_model: str | None
) -> str:
    """The release's entry for sae-lens' pretrained_saes.yaml."""
    import yaml

    model = entries[0].cfg.get("metadata", {}).get("model_name")
    saes = []
    for entry in entries:
        sae: dict[str, Any] = {"id": entry.sae_id, "path": entry.sae_id}
        metrics = entry.record.get("metrics_saebench", {})
        if "explained_variance" in metrics:
            sae["variance_explained"] = round(metrics["explained_variance"], 4)
        if "l0" in metrics:
            sae["l0"] = round(metrics["l0"], 2)
        if neuronpedia_model:
            sae["neuronpedia"] = f"{neuronpedia_model}/{entry.sae_id.replace('/', '-')}"
        saes.append(sae)
    body = {release: {"repo_id": repo_id, "model": model, "conversion_func": None, "saes": saes}}
    return yaml.safe_dump(body, sort_keys=False)


def model_card(entries: list[ReleaseEntry], release: str, repo_id: str) -> str:
    """README.md with Hugging Face front matter: what the SAEs read, how to load them, their metrics."""
    meta = entries[0].cfg.get("metadata", {})
    rows = []
    for e in entries:
        m = e.record.get("metrics_saebench", {})
        cells = [f"{m[k]:.4g}" if k in m else "" for k in ("explained_variance", "l0", "ce_loss_score")]
        pruning = e.record.get("pruning") or {}
        rows.append(
            f"| `{e.sae_id}` | {e.cfg.get('architecture', '')} | {e.cfg.get('d_sae', '')} | "
            f"{pruning.get('method', 'dense')} {pruning.get('sparsity', 0.0):g} | " + " | ".join(cells) + " |"
        )
    return f"""---
library_name: saelens
tags:
- sparse-autoencoder
- lit_prune
---

# {release}

Sparse autoencoders trained with lit_prune on the residual stream (`{meta.get("hook_name")}`,
TransformerLens name `{meta.get("hook_name_transformer_lens")}`) of `{meta.get("model_name")}`, some on
pruned copies of it (the pruning column; the SAE then reads the pruned model's activations).
Inputs: {meta.get("context_size")}-token sequences of `{meta.get("dataset_path")}`, BOS prepended:
{meta.get("prepend_bos")}, position 0 excluded (`seqpos_slice` {meta.get("seqpos_slice")}); raw
activations (the training normalisation is folded into the weights).

## Loading

```python
from sae_lens import SAE
sae = SAE.from_pretrained("{release}", "{entries[0].sae_id}")  # once pretrained_saes.yaml is registered
sae = SAE.load_from_disk("{entries[0].sae_id}")  # from a clone of {repo_id}
```

## SAEs

Metrics under SAEBench's names (lit_prune's docs/metric_names.md), on a held-out split of the corpus.

| sae_id | architecture | d_sae | pruning | explained_variance | l0 | ce_loss_score |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Each folder's `lit_prune.json` records the model, pruning condition, seed, corpus fingerprint,
hyperparameters and package versions.
"""
