"""Normalized usage record and response metadata shared by every provider."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Usage:
    """Token counts as the provider reported them; ``None`` means not reported."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cache_creation_tokens: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cache_creation_tokens": self.cache_creation_tokens,
        }


@dataclass(slots=True)
class ResponseMeta:
    """What a response said about itself: model, usage, finish reason, in-stream error."""

    model: str | None = None
    finish_reason: str | None = None
    response_id: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "finish_reason": self.finish_reason,
            "response_id": self.response_id,
            "upstream_error": self.error,
            **self.usage.as_dict(),
        }
