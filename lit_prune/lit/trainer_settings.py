"""The user's Trainer settings, checked where the Trainer is built: one line instead of Lightning's
traceback (an unknown strategy or accelerator, devices the accelerator refuses, ...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException

from lit_prune.errors import LitPruneError, described, first_line, invalid

T = TypeVar("T", bound=L.Trainer)

# what Lightning raises for settings it refuses (ImportError: a strategy or accelerator whose package is missing)
_REFUSALS = (MisconfigurationException, ValueError, TypeError, ImportError)


def checked_trainer(build: Callable[[], T]) -> T:
    """build(): the Trainer, or a one-line LitPruneError if Lightning refuses its settings."""
    try:
        trainer = build()
    except LitPruneError:
        raise
    except _REFUSALS as err:
        message = described(err) if isinstance(err, ImportError) else first_line(err)
        raise LitPruneError(f"trainer settings: {message}") from None
    check_launcher(trainer)
    return trainer


def check_launcher(trainer: L.Trainer) -> None:
    """Spawned ranks receive the LightningModule pickled, and sae-lens' SAE holds a lambda that
    cannot be pickled: refuse before the launch fails deep inside multiprocessing."""
    start = getattr(trainer.strategy, "_start_method", None)
    if start in ("spawn", "forkserver"):
        raise invalid(
            "trainer.strategy",
            f"{type(trainer.strategy).__name__}(start_method={start!r})",
            "ddp (the default for several devices) or ddp_fork: spawned ranks cannot receive sae-lens' SAE",
        )


def quiet_lightning() -> None:
    """Each step is a Lightning run; their start-up chatter would drown the study's progress bar."""
    import logging

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
