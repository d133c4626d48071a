"""Run untrusted Python (model-written code) so that it cannot hurt the host.

Each run is one fresh process in a scratch directory that is removed afterwards, with:
- a wall-clock timeout (the whole process group is killed), and CPU-time, memory, file-size and
  process-count limits (setrlimit);
- no network: a new, empty network namespace where the host permits (root), else an audit hook that
  refuses to create sockets;
- as root, the privileges of `nobody`, so that the process-count limit applies and the host's files are
  out of reach (`rm -rf ~` meets a HOME that is the scratch directory, and nothing else is writable).
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
NOBODY = 65534
# Prepended to the program: whatever the namespace gives, sockets are refused.
NO_SOCKETS = (
    "import sys as _s\n"
    "def _phi4_guard(event, args):\n"
    "    if event.startswith('socket.') and event != 'socket.gethostname':\n"
    "        raise PermissionError('network access is disabled in the phi4 sandbox')\n"
    "_s.addaudithook(_phi4_guard)\n"
    "del _s, _phi4_guard\n"
)


@dataclass(frozen=True)
class SandboxLimits:
    timeout_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    max_processes: int = 32
    max_file_bytes: int = 16 << 20


@dataclass(frozen=True)
class ExecutionResult:
    status: str  # "passed", "failed" (non-zero exit), or "timeout"
    exit_code: int | None
    output: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _restrict(limits: SandboxLimits, scratch_uid: int | None) -> None:
    """Runs in the child between fork and exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare(CLONE_NEWNET)  # fails without privileges; the audit hook still refuses sockets
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if scratch_uid is not None:
        os.setgroups([])
        os.setgid(scratch_uid)
        os.setuid(scratch_uid)


def _world_executable(path: str) -> bool:
    """Whether a user with no rights of its own (nobody) can run `path`: every directory on the way o+x."""
    path = os.path.realpath(path)
    if not os.path.isfile(path):
        return False
    parts = path.split(os.sep)
    for end in range(2, len(parts) + 1):
        if not os.stat(os.sep.join(parts[:end]) or os.sep).st_mode & 0o001:
            return False
    return True


def _interpreter() -> tuple[str, int | None]:
    """The Python to run, and the uid to drop to (None: no privileges to drop, or no Python nobody can run)."""
    if os.geteuid() != 0:
        return sys.executable, None
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if _world_executable(candidate):
            return os.path.realpath(candidate), NOBODY
    return sys.executable, None


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    scratch = tempfile.mkdtemp(prefix="phi4-sandbox-")
    interpreter, drop_to = _interpreter()
    try:
        if drop_to is not None:
            os.chown(scratch, drop_to, drop_to)
        path = os.path.join(scratch, "program.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(NO_SOCKETS + program)
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "PYTHONDONTWRITEBYTECODE": "1",
               "LANG": "C.UTF-8"}
        process = subprocess.Popen(
            [interpreter, "-I", path], cwd=scratch, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: _restrict(limits, drop_to),  # noqa: PLW1509 - no threads are started before
        )
        try:
            output, _ = process.communicate(timeout=limits.timeout_seconds)
            status = "passed" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            output, status = b"", "timeout"
        finally:
            _kill_group(process)
        return ExecutionResult(status, process.returncode, output.decode("utf-8", "replace")[-4000:])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the program and everything it started (they share its session's process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
