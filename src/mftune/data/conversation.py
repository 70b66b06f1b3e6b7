"""The format-independent conversation every record is parsed into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant", "text"]


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation.

    `role == "text"` is raw text (continued pre-training), trained as a whole.
    """

    role: Role
    content: str


@dataclass(frozen=True)
class Conversation:
    """A parsed record: its turns, the raw record (for Jinja templates that read other fields) and the
    format it was read in (MFTCoder's role markers render single-turn pairs their own way)."""

    turns: tuple[Turn, ...]
    record: dict = field(default_factory=dict, compare=False)
    source_format: str = field(default="", compare=False)

    @property
    def is_single_pair(self) -> bool:
        """A prompt/answer record (alpaca or another pair, no history): an optional system, a user, an assistant."""
        roles = [t.role for t in self.turns if t.role != "system"]
        return self.source_format == "alpaca" and roles == ["user", "assistant"]

    def as_messages(self) -> list[dict[str, str]]:
        """The turns as OpenAI-style `{"role", "content"}` dicts."""
        return [{"role": t.role, "content": t.content} for t in self.turns]
