"""The one schema every preference source is normalised to, and the error that locates bad input.

A :class:`PreferencePair` is a pair id, the prompt as chat messages, the chosen and rejected
responses, and free-form metadata; it is the type every stage passes around, from ``load_pairs``
through the feature store (``FeatureStore.pairs()``) to training and evaluation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.files import content_hash

__all__ = ["DataError", "LoadReport", "PairSet", "PreferencePair", "ROLES", "prompt_key"]

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad input, located: which file, which record, which field, and what is wrong."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        record: Any = None,
        field: str | None = None,
        reason: str = "invalid",
    ):
        self.detail, self.file, self.record, self.field, self.reason = message, file, record, field, reason
        where = [str(file)] if file is not None else []
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def located(self, file: str, record: Any) -> DataError:
        return DataError(self.detail, file=file, record=record, field=self.field, reason=self.reason)


@dataclass(frozen=True)
class PreferencePair:
    id: str
    prompt: tuple[dict, ...]
    chosen: str
    rejected: str
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "prompt": [dict(m) for m in self.prompt],
            "chosen": self.chosen,
            "rejected": self.rejected,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreferencePair:
        """The inverse of ``to_dict`` (the feature store's ``pairs.jsonl`` rows)."""
        return cls(
            id=str(d["id"]),
            prompt=tuple(dict(m) for m in d["prompt"]),
            chosen=d["chosen"],
            rejected=d["rejected"],
            metadata=dict(d.get("metadata") or {}),
        )

    @property
    def prompt_key(self) -> str:
        """A content hash of the prompt messages: pairs with equal keys share a prompt."""
        return prompt_key(self.prompt)

    @property
    def prompt_text(self) -> str:
        """The last user turn: a short human-readable handle on the prompt."""
        users = [m["content"] for m in self.prompt if m["role"] == "user"]
        return users[-1] if users else (self.prompt[-1]["content"] if self.prompt else "")


@dataclass
class LoadReport:
    """What was read, what was kept, and what was skipped and why (lenient mode, ties)."""

    source: str
    format: str = ""
    n_records: int = 0
    n_pairs: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, error: DataError) -> None:
        self.skipped[error.reason] += 1
        if len(self.examples) < 20:
            self.examples.append(str(error))

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.format,
            "n_records": self.n_records,
            "n_pairs": self.n_pairs,
            "skipped": dict(self.skipped),
            "examples": list(self.examples),
        }


@dataclass
class PairSet:
    pairs: list[PreferencePair]
    report: LoadReport

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]

    def content_hash(self) -> str:
        return content_hash([p.to_dict() for p in self.pairs])

    def to_records(self) -> list[dict]:
        return [p.to_dict() for p in self.pairs]


def prompt_key(messages) -> str:
    """The content hash that says which pairs share a prompt (stage 1's prompt groups, stage 4's
    split by prompt, stage 5's distinct prompts)."""
    return content_hash([dict(m) for m in messages])
