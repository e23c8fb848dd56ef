"""DataModule: packed token sequences for train / calibration / eval from any corpus."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lit_prune.data.corpora import files_identity, load_documents
from lit_prune.data.splits import documents_of_split
from lit_prune.data.tokens import pack_documents, shuffled, tokens_fingerprint
from lit_prune.errors import LitPruneError, invalid
from lit_prune.files import atomic_path, writing_into
from lit_prune.models.registry import load_tokenizer, model_dir


class TokenDataset(Dataset):
    """Rows of a LongTensor [n, seq_len] as {"input_ids": [seq_len]}."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


class TokenDataModule(L.LightningDataModule):
    """Tokenized, packed, fixed-length sequences with disjoint splits assigned by document hash.

    Args:
        model_name: whose tokenizer to use (linked to model.model_name by the CLI).
        corpus: python-docs (embedded, offline), a local .txt/.jsonl/.parquet file, directory or glob,
            or hf:org/name for a hub dataset streamed with `datasets`.
        text_field: the text column of jsonl / parquet / hub datasets.
        hub_config: configuration name of a hub dataset.
        hub_split: split of a hub dataset to stream.
        seq_len: tokens per packed training / eval sequence.
        batch_size: sequences per LM forward pass (per device).
        train_tokens: tokens to train on (rounded down to whole sequences).
        eval_tokens: tokens in the eval split (>= 80k to count dead latents reliably).
        calibration_sequences: number of calibration sequences (for Wanda).
        calibration_seq_len: length of each calibration sequence (explicit cap).
        eval_fraction: share of documents assigned to eval (by hash).
        calibration_fraction: share of documents assigned to calibration (by hash).
        split_salt: salt of the document hash; change it to draw different splits.
        shuffle_seed: fixes the order of training documents and the calibration sample.
        prepend_bos: start each packed sequence with the BOS token.
        num_workers: DataLoader workers.
        cache_dir: where the embedded corpus and tokenized splits are cached.
        model_cache_dir: where converted / built models are cached.
    """

    if TYPE_CHECKING:  # save_hyperparameters() fills it; Lightning's MutableMapping type has no fields
        hparams: Any

    def __init__(
        self,
        model_name: str = "smollm2-135m",
        corpus: str = "python-docs",
        text_field: str = "text",
        hub_config: str | None = None,
        hub_split: str = "train",
        seq_len: int = 128,
        batch_size: int = 32,
        train_tokens: int = 500_000,
        eval_tokens: int = 81_920,
        calibration_sequences: int = 32,
        calibration_seq_len: int = 256,
        eval_fraction: float = 0.03,
        calibration_fraction: float = 0.01,
        split_salt: str = "lit_prune",
        shuffle_seed: int = 0,
        prepend_bos: bool = False,
        num_workers: int = 0,
        cache_dir: str = "checkpoints",
        model_cache_dir: str = "checkpoints/models",
    ) -> None:
        super().__init__()
        for field, value in dict(
            seq_len=seq_len, eval_tokens=eval_tokens, calibration_seq_len=calibration_seq_len
        ).items():
            if value < 2:
                raise invalid(f"data.{field}", value, "an integer >= 2")
        if batch_size < 1:
            raise invalid("data.batch_size", batch_size, "an integer >= 1")
        if train_tokens < seq_len:
            raise invalid(
                "data.train_tokens", train_tokens, f"at least data.seq_len={seq_len} (one sequence)"
            )
        for field, value in dict(
            calibration_sequences=calibration_sequences, num_workers=num_workers
        ).items():
            if value < 0:
                raise invalid(f"data.{field}", value, "an integer >= 0")
        self.save_hyperparameters()
        self.fractions = {"eval": eval_fraction, "calibration": calibration_fraction}
        self.train_ids = self.eval_ids = self.calibration_ids = torch.empty(0, seq_len, dtype=torch.long)
        self.provenance: dict[str, Any] = {}

    def prepare_data(self) -> None:
        model_dir(self.hparams.model_name, self.hparams.model_cache_dir)
        self._splits()

    def setup(self, stage: str | None = None) -> None:
        if self.train_ids.numel() == 0:
            self.train_ids, self.eval_ids, self.calibration_ids = self._splits()
            self.provenance = self._provenance()
            self._warn_if_short()

    def _warn_if_short(self) -> None:
        """The corpus ran out before the token budget: say so (the run goes on with what there is)."""
        hp = self.hparams
        for name, ids, asked in (
            ("train_tokens", self.train_ids, hp.train_tokens // hp.seq_len * hp.seq_len),
            ("eval_tokens", self.eval_ids, -(-hp.eval_tokens // hp.seq_len) * hp.seq_len),
        ):
            if ids.numel() < asked:
                rank_zero_warn(
                    f"data.{name}={getattr(hp, name):,}: the corpus {hp.corpus!r} has only "
                    f"{ids.numel():,} tokens for this split, so the run uses those"
                )

    def _docs(self, split: str):
        hp = self.hparams
        with writing_into("data.cache_dir", hp.cache_dir):
            docs = load_documents(
                hp.corpus,
                text_field=hp.text_field,
                cache_dir=Path(hp.cache_dir) / "corpora",
                hub_config=hp.hub_config,
                hub_split=hp.hub_split,
            )
        return documents_of_split(docs, split, self.fractions, hp.split_salt)

    def _splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(train, eval, calibration) token ids, cached on disk by their settings."""
        path = Path(self.hparams.cache_dir) / "tokens" / f"{self._cache_key()}.pt"
        if path.is_file():
            return tuple(torch.load(path))  # type: ignore[return-value]
        hp = self.hparams
        tokenizer = load_tokenizer(hp.model_name, hp.model_cache_dir)
        pack = lambda docs, length, n: pack_documents(docs, tokenizer, length, n, hp.prepend_bos)  # noqa: E731
        train = pack(
            shuffled(self._docs("train"), hp.shuffle_seed), hp.seq_len, hp.train_tokens // hp.seq_len
        )
        evaluation = pack(self._docs("eval"), hp.seq_len, -(-hp.eval_tokens // hp.seq_len))
        calibration = pack(
            shuffled(self._docs("calibration"), hp.shuffle_seed),
            hp.calibration_seq_len,
            hp.calibration_sequences,
        )
        for name, ids in (("train", train), ("eval", evaluation)):
            if ids.shape[0] == 0:
                raise LitPruneError(
                    f"data.corpus={hp.corpus!r} yielded no {name} sequences of {hp.seq_len} tokens"
                )
        with writing_into("data.cache_dir", hp.cache_dir), atomic_path(path) as tmp:
            torch.save((train, evaluation, calibration), tmp)
        return train, evaluation, calibration

    def _cache_key(self) -> str:
        settings = {
            k: v for k, v in self.hparams.items() if k not in ("batch_size", "num_workers", "cache_dir")
        }
        files = files_identity(self.hparams.corpus)
        if files is not None:  # only then, so that the keys of the other corpora stay as they were
            settings["corpus_files"] = files
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _provenance(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            "corpus": hp.corpus,
            "split_salt": hp.split_salt,
            "fractions": self.fractions,
            "seed": hp.shuffle_seed,
            "seq_len": hp.seq_len,
            "fingerprint": tokens_fingerprint(self.train_ids, self.eval_ids, self.calibration_ids),
            "train_tokens": int(self.train_ids.numel()),
            "eval_tokens": int(self.eval_ids.numel()),
            "calibration_tokens": int(self.calibration_ids.numel()),
        }

    def _loader(self, ids: torch.Tensor) -> DataLoader:
        return DataLoader(
            TokenDataset(ids),
            batch_size=self.hparams.batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_ids)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_ids)


def datamodule_of(trainer: L.Trainer) -> TokenDataModule:
    """The trainer's TokenDataModule (Lightning sets `trainer.datamodule` at run time; its typing omits it)."""
    return trainer.datamodule  # pyright: ignore[reportAttributeAccessIssue]
