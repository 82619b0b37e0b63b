"""Whether the process that left a file behind still runs.

Temporary files and folders carry their writer's PID (render work folders, checkpoint temps),
so that a later run can remove what a killed one left without touching a live one's.
"""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """True for a running process, also another user's; False for none (and for pid <= 0,
    which kill() would read as a whole process group)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
