"""Test-only Lightning callback, loaded by class path in CLI subprocesses (tests/test_ddp_equivalence.py):
every rank writes its SAE's parameters at the end of fit, so a test can compare the replicas."""

from pathlib import Path

import lightning as L
import torch


class DumpSAEReplicas(L.Callback):
    """Writes <out_dir>/rank<r>.pt: {name: tensor} of the SAE parameters on global rank r."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.sae.state_dict().items()}
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")
