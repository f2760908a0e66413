"""Token usage of one call, as the provider reported it (or as counted when it did not)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0  # all input tokens, cached ones included
    completion_tokens: int = 0
    cached_tokens: int = 0  # input tokens read from the provider's prompt cache
    cache_write_tokens: int = 0  # input tokens written to the provider's prompt cache (Anthropic)
    reported: bool = True  # False when counted by the sidecar because the provider sent none

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
