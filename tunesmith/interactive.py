"""`tunesmith run NAME [PROMPT]`: one answer, or a chat in the terminal until /bye, as `ollama run` (Ollama's
cmd/interactive.go). It talks to the server through the client (tunesmith/serve/client.py)."""

from __future__ import annotations

import sys
from typing import IO, Any

from tunesmith.serve.client import chat_stream


def run(host: str | None, name: str, prompt: str | None = None, *, stdin: IO[str] | None = None,
        stdout: IO[str] | None = None, options: dict[str, Any] | None = None, api_key: str | None = None) -> None:
    """`tunesmith run NAME [PROMPT]`: one answer for PROMPT, else an interactive chat until /bye or EOF.

    Multi-line input goes between triple quotes, as in `ollama run`.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty() and prompt is None
    messages: list[dict[str, Any]] = []

    def answer(text: str) -> None:
        messages.append({"role": "user", "content": text})
        reply = []
        for chunk in chat_stream(host, name, messages, options=options, api_key=api_key):
            piece = chunk.message.content or ""
            reply.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n\n" if interactive else "\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})

    if prompt is not None:
        answer(prompt)
        return
    if not interactive:
        # Piped input is one prompt, as `echo hi | ollama run NAME` does.
        text = stdin.read().strip()
        if text:
            answer(text)
        return
    while True:
        stdout.write(">>> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            return
        text = line.rstrip("\n")
        if text.strip() in ("/bye", "/exit"):
            return
        if text.startswith('"""'):
            parts = [text[3:]]
            while not parts[-1].endswith('"""'):
                stdout.write("... ")
                stdout.flush()
                more = stdin.readline()
                if not more:
                    break
                parts.append(more.rstrip("\n"))
            text = "\n".join(parts).removesuffix('"""')
        if text.strip() == "/clear":
            messages.clear()
            continue
        if text.strip():
            answer(text)
