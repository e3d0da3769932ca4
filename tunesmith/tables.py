"""What `tunesmith list`, `ps` and `show` print, laid out as `ollama list`, `ollama ps` and `ollama show` print
them (Ollama keeps these in its cmd/cmd.go, apart from the API client)."""

from __future__ import annotations

import datetime

from gguf import Keys

from tunesmith.serve import modelfile
from tunesmith.serve.client import list_models, ps, show


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _human(when: datetime.datetime) -> str:
    """`4 minutes ago`, `4 minutes from now`: Ollama's format.HumanTime, as `ollama list` and `ps` print."""
    seconds = (datetime.datetime.now(datetime.UTC) - when).total_seconds()
    suffix = "ago" if seconds >= 0 else "from now"
    for unit, span in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if abs(seconds) >= span:
            return f"{int(abs(seconds) // span)} {unit} {suffix}"
    return "just now" if seconds >= 0 else "less than a minute from now"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("    ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def list_table(host: str | None = None, api_key: str | None = None) -> str:
    """`tunesmith list` output, as `ollama list` prints it."""
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    for m in list_models(host, api_key):
        rows.append([m["name"], m["digest"][:12], _size(m["size"]), _human(m["modified_at"])])
    return _table(rows)


def ps_table(host: str | None = None, api_key: str | None = None) -> str:
    """`tunesmith ps` output, as `ollama ps` prints it."""
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    for m in ps(host, api_key):
        rows.append([m.name or m.model, (m.digest or "")[:12], _size(m.size or 0), "100% CPU",
                     str(m.context_length or ""), _human(m.expires_at) if m.expires_at else "Never"])
    return _table(rows)


def show_text(host: str | None, name: str, *, modelfile_only: bool = False, api_key: str | None = None) -> str:
    """`tunesmith show NAME` (or `--modelfile`)."""
    info = show(host, name, api_key)
    if modelfile_only:
        return info.modelfile or ""
    d = info.details.model_dump(exclude_none=True) if info.details else {}
    meta = info.modelinfo or {}
    arch = d.get("family", "")
    lines = ["  Model",
             f"    architecture        {arch}",
             f"    parameters          {d.get('parameter_size', '')}",
             f"    context length      {meta.get(Keys.LLM.CONTEXT_LENGTH.format(arch=arch), '')}",
             f"    embedding length    {meta.get(Keys.LLM.EMBEDDING_LENGTH.format(arch=arch), '')}",
             f"    quantization        {d.get('quantization_level', '')}",
             "", "  Capabilities", *[f"    {c}" for c in info.capabilities or []]]
    if info.parameters:
        lines += ["", "  Parameters", *[f"    {p}" for p in info.parameters.splitlines()]]
    # The client's ShowResponse drops the wire's `system`; the Modelfile the server sends carries it.
    system = modelfile.parse(info.modelfile).system if info.modelfile else None
    if system:
        lines += ["", "  System", f"    {system}"]
    if info.license:
        lines += ["", "  License", f"    {info.license.splitlines()[0]}"]
    return "\n".join(lines)
