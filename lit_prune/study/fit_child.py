"""`python -m lit_prune.study.fit_child SPEC.json`: the child process of `fit_worker.fit_in_worker`.

Every rank runs `steps.run_fit` on the spec the study process wrote; global rank 0 writes
`fit_result.json` (the summary the in-process fit returns) once the other ranks have exited.
A module of its own so that the launcher, which `steps` imports, does not import `steps`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lit_prune.study.fit_worker import RESULT, die_with_parent


def main(argv: list[str]) -> int:
    die_with_parent()
    if len(argv) != 1:
        print("usage: python -m lit_prune.study.fit_child SPEC.json", file=sys.stderr)
        return 2
    from lit_prune.lit.trainer_settings import quiet_lightning
    from lit_prune.models.activation_cache import sharing_activations
    from lit_prune.study.config import PruneCondition, StudySettings
    from lit_prune.study.steps import StudyContext, run_fit

    spec = json.loads(Path(argv[0]).read_text())
    ctx = StudyContext(
        name=spec["name"],
        settings=StudySettings(**spec["settings"]),
        model=spec["model"],
        data=spec["data"],
        trainer=spec["trainer"],
        seed_everything=spec["seed_everything"],
    )
    c = spec["condition"]
    cond = (
        None
        if c is None
        else PruneCondition(
            c["method"], c["sparsity"], tuple(c["nm"]) if c["nm"] else None, bool(c.get("recovered", False))
        )
    )
    out = Path(spec["out"])
    quiet_lightning()
    with sharing_activations(int(ctx.settings.cache_gb * (1 << 30))):
        trainer, result = run_fit(ctx, out, int(spec["seed"]), cond, distributed=True)
    failed = 0
    for proc in getattr(trainer.strategy.launcher, "procs", None) or []:  # rank 0: the ranks it launched
        failed |= proc.wait() != 0
    if trainer.is_global_zero and not failed:
        tmp = out / f".{RESULT}.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out / RESULT)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
