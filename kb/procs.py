"""Process helpers shared by the floors above: ending a program with everything it started."""

from __future__ import annotations

import contextlib
import os
import signal


def kill_group(pid: int) -> None:
    """SIGKILL the process group that `pid` leads (a converter, OCR program or parse worker and the
    programs it started); nothing when the group is already gone or not ours."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
