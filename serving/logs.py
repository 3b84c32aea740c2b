"""vLLM's own reason for failing, as one line, read from its log (the server's stdout and stderr)."""

from __future__ import annotations

import re

_MAX_REASON_CHARS = 400

_LOG_PREFIX = re.compile(
    r"^(?:\([\w:.-]+ pid=\d+\) )?(?:(?:ERROR|WARNING|INFO|DEBUG|CRITICAL) \S+ \S+ \[[^\]]*\] )?"
)
_EXCEPTION_LINE = re.compile(
    r"^((?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Exit|Warning|Interrupt))(?::\s?(.*))?$"
)
_ARGPARSE_ERROR = re.compile(r"^[\w.-]+\.py: error: (.+)$")
_LONG_LIST = re.compile(r"\[(?:'[^']*', ){10,}'[^']*'\]")  # e.g. every architecture vLLM supports
_GENERIC = re.compile(
    r"see (the )?(stack trace|root cause)|check the stack trace|EngineCore encountered an issue",
    re.IGNORECASE,
)


def failure_reason(log: str) -> str | None:
    """vLLM's own reason for failing, as one line, from its log: the last exception line that is not a wrapper
    ("see root cause above"), with pydantic's indented detail line folded in; None if there is none."""
    lines = [_LOG_PREFIX.sub("", line.rstrip()) for line in log.splitlines()]
    found: list[tuple[str, bool]] = []
    for i, line in enumerate(lines):
        usage = _ARGPARSE_ERROR.match(line)
        if usage:
            found.append((f"bad server argument: {usage.group(1)}", False))
            continue
        match = _EXCEPTION_LINE.match(line)
        if not match:
            continue
        name, text = match.group(1).rsplit(".", 1)[-1], (match.group(2) or "").strip()
        if name == "ValidationError" and i + 1 < len(lines):
            text = _pydantic_detail(lines[i + 1 :]) or text
        found.append((f"{name}: {text}" if text else name, bool(_GENERIC.search(text))))
    if not found:
        return None
    specific = [reason for reason, generic in found if not generic]
    reason = (specific or [found[-1][0]])[-1]
    reason = _LONG_LIST.sub(
        lambda m: f"[{m.group(0).count(',') + 1} names, see the log]", " ".join(reason.split())
    )
    return reason if len(reason) <= _MAX_REASON_CHARS else reason[: _MAX_REASON_CHARS - 1] + "…"


def _pydantic_detail(following: list[str]) -> str | None:
    """pydantic prints `<loc>` then `  Value error, <message> [type=..., input_value=...]` under the header."""
    for line in following[:4]:
        if line.startswith("  ") and not line.strip().startswith("For further information"):
            detail = re.sub(r"\s*\[type=.*$", "", line.strip())
            detail = re.sub(r"^(Value|Assertion) error, ", "", detail)
            if detail:
                return detail
    return None
