"""Split Qwen3-style output into thinking and content: `<think>…</think>` at the start is the reasoning.

Fed piece by piece as tokens stream, so a tag split across tokens (`<th` + `ink>`) is still found.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def infer_tags(template: str) -> tuple[str, str] | None:
    """The thinking tags a template uses, as Ollama's `thinking.InferTags` finds them (Qwen3 style only)."""
    return (OPEN, CLOSE) if OPEN in template or ".Think" in template else None


class ThinkingParser:
    def __init__(self, opening: str = OPEN, closing: str = CLOSE, *, started: bool = False):
        self.opening, self.closing = opening, closing
        # "start": before any output; "thinking": inside the tags; "content": after them (or never had them).
        self.state = "thinking" if started else "start"
        self.buffer = ""

    def add(self, piece: str) -> tuple[str, str]:
        """Feed a piece of output; returns (thinking, content) that are certain so far."""
        self.buffer += piece
        thinking = content = ""
        while True:
            if self.state == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(self.opening):
                    self.buffer = stripped[len(self.opening):].lstrip()
                    self.state = "thinking"
                    continue
                if self.opening.startswith(stripped):
                    return thinking, content  # maybe the tag is still coming
                self.state = "content"
                continue
            if self.state == "thinking":
                end = self.buffer.find(self.closing)
                if end >= 0:
                    thinking += self.buffer[:end].rstrip()
                    self.buffer = self.buffer[end + len(self.closing):].lstrip()
                    self.state = "after"
                    continue
                keep = _partial_suffix(self.buffer, self.closing)
                thinking += self.buffer[:len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return thinking, content
            if self.state == "after":
                # Whitespace between </think> and the answer belongs to neither.
                self.buffer = self.buffer.lstrip()
                if not self.buffer:
                    return thinking, content
                self.state = "content"
            content += self.buffer
            self.buffer = ""
            return thinking, content

    def flush(self) -> tuple[str, str]:
        """What is left at the end of the output."""
        rest, self.buffer = self.buffer, ""
        if self.state == "thinking":
            return rest, ""
        return "", rest if self.state != "after" else rest.lstrip()


def _partial_suffix(text: str, tag: str) -> int:
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
