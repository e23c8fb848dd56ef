"""Test-only Lightning callback, loaded by class path in CLI subprocesses (tests/lit/test_ddp_equivalence.py,
tests/lit/test_pruned_lm_module.py): every rank writes its module's parameters at the end of fit, so a
test can compare the replicas."""

from pathlib import Path

import lightning as L
import torch


class DumpReplicas(L.Callback):
    """Writes <out_dir>/rank<r>.pt: {name: tensor} of the state dict of the LightningModule's
    `attribute` (the SAEModule's sae, the PrunedLMModule's lm) on global rank r."""

    def __init__(self, out_dir: str, attribute: str = "sae") -> None:
        self.out_dir = Path(out_dir)
        self.attribute = attribute

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        module = getattr(pl_module, self.attribute)
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")
