"""lit_prune: pruning language models and measuring what happens to their SAE features.

The public API, imported on first use so that `import lit_prune` stays fast (torch, transformers and
Lightning load only when a function is reached for):

- `prune_model(model, method, sparsity, ...)`: prune in place, return the keep-masks (docs/methods.md §1).
- `load_sae(path)` / `export_sae(sae, path, norm_scale, metadata)`: SAEs on disk in sae-lens format.
- `match_features(dec_a, dec_b)`: one-to-one matching of decoder rows by cosine (docs/methods.md §3).
- `seed_stability(decoders)`: how reproducible features are across SAE seeds (RQ1, docs/methods.md §4).
- `write_report(study_dir)`: a study's report from its finished steps.

The command line is `lit-prune` (or `python -m lit_prune`); see `lit-prune --help`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = {  # name -> module that defines it
    "prune_model": "lit_prune.pruning",
    "load_sae": "lit_prune.sae.io",
    "export_sae": "lit_prune.sae.io",
    "match_features": "lit_prune.analysis.matching",
    "seed_stability": "lit_prune.analysis.survival",
    "write_report": "lit_prune.study.report",
}
__all__ = [
    "__version__",
    "export_sae",
    "load_sae",
    "match_features",
    "prune_model",
    "seed_stability",
    "write_report",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from lit_prune.analysis.matching import match_features
    from lit_prune.analysis.survival import seed_stability
    from lit_prune.pruning import prune_model
    from lit_prune.sae.io import export_sae, load_sae
    from lit_prune.study.report import write_report


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'lit_prune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
