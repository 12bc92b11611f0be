"""Processes the tests start in sessions of their own (a CLI driver and the Ray it starts): kill
a whole session, and when one hangs, say where every process of it was stuck."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def session_members(session_id: int) -> list[int]:
    """The live processes of a session (zombies left out)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":  # after "(comm)": state ppid pgrp session
            members.append(int(stat.parent.name))
    return members


def kill_session(session_id: int) -> None:
    """SIGKILL every process of a session, and wait until none is left.

    Ray's daemons and actors leave the driver's process group but stay in its session; killing
    only the group would let an actor finish one more entry after the test counted them.
    """
    deadline = time.time() + 30
    while time.time() < deadline:
        members = session_members(session_id)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"processes of session {session_id} survived SIGKILL")


def session_stacks(session_id: int, limit: int = 12) -> str:
    """The Python stacks of a session's processes (py-spy, when installed), for the message of a
    test that timed out: a hang names the call it hangs in, not only the time it took."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if spy is None:
        return "(py-spy is not installed: no stacks)"
    dumps = []
    for pid in session_members(session_id)[:limit]:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
            done = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
            dumps.append(f"--- pid {pid}: {command}\n{done.stdout[-4000:]}{done.stderr[-500:]}")
        except (OSError, subprocess.TimeoutExpired) as error:
            dumps.append(f"--- pid {pid}: {error}")
    return "\n".join(dumps)


def communicate_or_explain(process: subprocess.Popen, timeout: float) -> str:
    """The output of a process started with ``start_new_session=True`` and a text stdout pipe;
    past ``timeout`` the test fails with its stacks and the end of its output (then the session
    is killed, whatever happens)."""
    try:
        output, _ = process.communicate(timeout=timeout)
        return output
    except subprocess.TimeoutExpired:
        stacks = session_stacks(process.pid)
        kill_session(process.pid)
        output, _ = process.communicate()
        raise AssertionError(f"{' '.join(map(str, process.args))[:300]} did not end in {timeout:.0f} s.\n"
                             f"Its output ends:\n{(output or '')[-6000:]}\nWhere its processes were:\n{stacks}"
                             ) from None
    finally:
        kill_session(process.pid)  # whatever its Ray left behind
