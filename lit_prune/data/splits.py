"""Train / calibration / eval splits of a corpus, assigned per document by a salted sha256 of its
text: deterministic, disjoint, and independent of document order and of the source."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType

from lit_prune.errors import invalid

SPLITS = ("train", "calibration", "eval")
DEFAULT_FRACTIONS: Mapping[str, float] = MappingProxyType({"eval": 0.03, "calibration": 0.01})
DEFAULT_SALT = "lit_prune"


def validate_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """`{"eval": f, "calibration": g}` with each in [0, 1) and f + g < 1 (train keeps the rest)."""
    unknown = sorted(set(fractions) - {"eval", "calibration"})
    if unknown:
        raise invalid("fractions", dict(fractions), "keys among 'eval' and 'calibration'")
    for name, value in fractions.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise invalid(f"fractions.{name}", value, "a number in [0, 1)")
    if sum(fractions.values()) >= 1:
        raise invalid("fractions", dict(fractions), "fractions summing to less than 1")
    return {
        "eval": float(fractions.get("eval", 0.0)),
        "calibration": float(fractions.get("calibration", 0.0)),
    }


def unit_hash(text: str, salt: str = DEFAULT_SALT) -> float:
    """sha256 of (salt, text) mapped to [0, 1): stable across processes and platforms."""
    digest = hashlib.sha256(salt.encode("utf-8") + b"\0" + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _assign(u: float, fractions: dict[str, float]) -> str:
    # Fixed interval order: [0, eval) -> eval, [eval, eval + calibration) -> calibration.
    if u < fractions["eval"]:
        return "eval"
    return "calibration" if u < fractions["eval"] + fractions["calibration"] else "train"


def split_of(text: str, fractions: Mapping[str, float] = DEFAULT_FRACTIONS, salt: str = DEFAULT_SALT) -> str:
    """`train`, `calibration` or `eval` for one document, decided by its salted hash."""
    return _assign(unit_hash(text, salt), validate_fractions(fractions))


def documents_of_split(
    documents: Iterable[str],
    split: str,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    salt: str = DEFAULT_SALT,
) -> Iterator[str]:
    """The documents that `split_of` assigns to `split`, in input order."""
    if split not in SPLITS:
        raise invalid("split", split, f"one of {', '.join(SPLITS)}")
    checked = validate_fractions(fractions)
    return (t for t in documents if _assign(unit_hash(t, salt), checked) == split)
