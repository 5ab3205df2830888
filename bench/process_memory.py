"""This process's resident memory from /proc, for the benches that measure peak memory.

`VmHWM` is the peak resident set; writing 5 to /proc/self/clear_refs resets it (Linux), so a
bench can measure the peak of the work alone, after its inputs are built.
"""

from __future__ import annotations

from pathlib import Path


def status_kb(field: str) -> int:
    """A /proc/self/status field in kB, e.g. `VmRSS` (now) or `VmHWM` (the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset `VmHWM` to the current resident set; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
