"""Memory sizes, short numbers and the one error type for input bigbatch cannot use.

`parse_memory_size` reads ``"20GiB"``, ``"512MB"`` or a byte count (pydantic's `ByteSize` does the
reading; the errors here stay one line naming the field); `format_bytes` and `format_number` are
what the progress bar, the reports and the memory choice print. `UsageError` is what bigbatch
raises for a bad config value, argument or run directory: the command line prints it as one line
(exit 2), while an exception from anyone else's code keeps its traceback. No torch is needed here.
"""

from __future__ import annotations

import math
from typing import Any

MAX_COUNT = 2**63 - 1
"""The largest count (items, steps, ranks, seed) bigbatch takes: what an int64 index holds."""


class UsageError(ValueError):
    """Input bigbatch cannot use: a config value, a command-line argument, a plan, a run directory.

    A ValueError, so library callers that catch ValueError keep working. The command line prints
    its message as one line and exits 2; any other exception keeps its traceback (exit 1).
    """


class UsageTypeError(UsageError, TypeError):
    """A `UsageError` about a value of the wrong type (a TypeError too, for library callers)."""


def one_line(text: str, limit: int = 400) -> str:
    """A message as one line of at most ``limit`` characters (a huge value is never echoed back).

    >>> one_line("first\\nsecond"), len(one_line("x" * 1000))
    ('first second', 400)
    """
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    tail = f"... ({len(flat)} chars)"
    return flat[: limit - len(tail)] + tail


def parse_memory_size(value: int | str, field: str = "memory_budget") -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"20GiB"`` or ``"1.5GB"``.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024 (case-insensitive).

    Raises:
        UsageTypeError: not an int or a string.
        UsageError: an unknown unit, or a size that is not positive or above 2**63 - 1.

    Example:
        >>> parse_memory_size("1.5GiB"), parse_memory_size("2GB"), parse_memory_size(123)
        (1610612736, 2000000000, 123)
    """
    from pydantic import ByteSize, TypeAdapter, ValidationError  # only here: `plan` stays light

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageTypeError(
            f"{field} must be a number of bytes or a string such as '20GiB', got "
            f"{shorten(value)} ({type(value).__name__})"
        )
    try:
        text = value.strip() if isinstance(value, str) else value
        size = int(TypeAdapter(ByteSize).validate_python(text))
    except (ValidationError, ValueError, OverflowError):  # 1e400 overflows a float
        raise UsageError(
            f"{field} {shorten(value)} is not a memory size: use a number of bytes with an "
            "optional unit B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB "
            "(powers of 1024), e.g. '20GiB'"
        ) from None
    if size <= 0:
        raise UsageError(f"{field} must be positive, got {shorten(value)}")
    if size > MAX_COUNT:
        raise UsageError(f"{field} {shorten(value)} is above 2**63 - 1 bytes; give a real size")
    return size


def format_bytes(num_bytes: float) -> str:
    """Three significant digits in powers of 1024.

    >>> format_bytes(3 * 2**30), format_bytes(3355443), format_bytes(512)
    ('3.00 GiB', '3.20 MiB', '512 B')
    """
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 999.5 or unit == "TiB":
            break
        size /= 1024
    decimals = 0 if unit == "B" or abs(size) >= 99.95 else 1 if abs(size) >= 9.995 else 2
    return f"{size:.{decimals}f} {unit}"


def format_number(value: Any) -> str:
    """Short numbers: integers as is, floats with 4 significant digits or in e-notation.

    >>> format_number(0.000123), format_number(1234.5), format_number(2.5), format_number(7)
    ('1.23e-04', '1234', '2.5', '7')
    """
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e7):
        return f"{value:.2e}"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}"


def shorten(value: Any, limit: int = 60) -> str:
    """repr(value), cut to ``limit`` characters: a message never echoes a huge value back.

    >>> shorten(10**5000), shorten("x" * 100, limit=12)
    ('an integer of 5001 digits', "'xxxxxx...x'")
    """
    if isinstance(value, int) and value.bit_length() > 256:  # repr of 4300+ digits would raise
        return f"an integer of {int(math.log10(abs(value))) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"
