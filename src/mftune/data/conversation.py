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
    """A parsed record: its turns plus the raw record (for Jinja templates that read other fields)."""

    turns: tuple[Turn, ...]
    record: dict = field(default_factory=dict, compare=False)

    def as_messages(self) -> list[dict[str, str]]:
        """The turns as OpenAI-style `{"role", "content"}` dicts."""
        return [{"role": t.role, "content": t.content} for t in self.turns]
