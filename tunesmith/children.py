"""Child processes that must not outlive the tunesmith process that started them."""

from __future__ import annotations

import os
import sys


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); a `preexec_fn`.

    Killing a tunesmith command (SIGKILL, the OOM killer, a lost terminal) runs no cleanup, so its children
    would live on: torchrun's workers, each in a session of its own, trained on orphaned and wrote checkpoints
    after the user thought the run had stopped (seen on 2 H200s); the local server that `tunesmith pipeline`
    starts kept port 11434, so the next pipeline found a server it had not started and did not serve itself."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
