"""Run untrusted Python (model-written code) so that it cannot hurt the host or another sample.

With bubblewrap (`bwrap`, Debian's package; the default when it is installed) each run gets new user,
PID, IPC, network, UTS and cgroup namespaces: a read-only view of /usr and the interpreter only (no /home,
/root, /work, /run or /var), a private tmpfs /tmp and /dev/shm, its own /proc (no other process is
visible, none can be signalled), its scratch directory as the only writable place, and no network. When
its program exits, the PID namespace ends and every process it started dies with it. As root, each
sample also runs as a user id of its own, so that its process-count limit is its alone.

Without bubblewrap (said once, in the log) the older sandbox runs instead: a process group with the same
resource limits, a new network namespace where permitted and an audit hook that refuses sockets.

Both: a wall-clock timeout, CPU-time, memory, file-size and process-count limits, output read as it comes
and capped (a flood is cut, not buffered), and a result that records the exit code, the signal, the run
time and whether the program printed the marker that the harness prints after the tests: a program that
exits early (`sys.exit(0)` before the tests) has not passed.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

logger = logging.getLogger("phi4.eval")
CLONE_NEWNET = 0x40000000
NOBODY = 65534
SAMPLE_UID_BASE = 2_000_000  # per-sample user ids, far above any real user's
_uids = itertools.count()
_warned = False
# Prepended to the program by the fallback sandbox: whatever the namespace gives, sockets are refused.
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
    timeout_seconds: float = 3.0  # simple-evals' limit for a HumanEval sample
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    max_processes: int = 32
    max_file_bytes: int = 16 << 20
    max_output_bytes: int = 1 << 20


@dataclass(frozen=True)
class ExecutionResult:
    status: str  # "completed" (ran to its end, marker seen), "failed", "timeout", "output_limit", "error"
    exit_code: int | None
    signal: int | None
    seconds: float
    output: str
    isolation: str  # "bubblewrap" or "limits"

    @property
    def passed(self) -> bool:
        return self.status == "completed"


@functools.cache
def bubblewrap() -> str | None:
    """bwrap, if it is installed and can make namespaces here (a container may forbid user namespaces)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    probe = subprocess.run([bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--ro-bind", "/", "/",
                            "--proc", "/proc", "--dev", "/dev", "true"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        logger.warning("bubblewrap is installed but cannot create namespaces here (%s)", probe.stderr.strip()[:200])
        return None
    return bwrap


def _world_accessible(path: str) -> bool:
    """Whether a user with no rights of its own can reach and read `path`: every directory on the way o+x."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    return os.path.exists(path) and all(os.stat(os.sep.join(parts[:end]) or os.sep).st_mode & 0o001
                                        for end in range(2, len(parts) + 1))


def _interpreter() -> str:
    """A Python that the sandbox can see: the system's, else this one's."""
    for candidate in ("/usr/bin/python3", os.path.realpath(sys.executable)):
        if os.path.isfile(candidate) and _world_accessible(candidate):
            return os.path.realpath(candidate)
    return os.path.realpath(sys.executable)


def _bwrap_command(bwrap: str, interpreter: str, scratch: str) -> list[str]:
    command = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-net", "--unshare-uts",
               "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
               "--hostname", "sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
               "--setenv", "HOME", "/sandbox", "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8",
               "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    prefix = os.path.dirname(os.path.dirname(interpreter))  # .../bin/python -> the installation
    if not prefix.startswith("/usr"):
        command += ["--ro-bind", prefix, prefix]
    command += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/dev/shm",
                "--bind", scratch, "/sandbox", "--chdir", "/sandbox", "--", interpreter, "-I", "program.py"]
    return command


def _limit(limits: SandboxLimits, uid: int | None) -> None:
    """Runs in the child between fork and exec: resource limits, and as root a user id of its own."""
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if uid is not None:  # a count of its own: other samples' processes do not use it up
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _limit_without_namespaces(limits: SandboxLimits, uid: int | None) -> None:
    ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)  # fails without privileges: the hook still holds
    _limit(limits, uid)


def run_python(program: str, limits: SandboxLimits = SandboxLimits(), marker: str | None = None) -> ExecutionResult:
    """Run `program`; it has completed only if it printed `marker` (when given) before it exited."""
    global _warned
    bwrap = bubblewrap()
    if bwrap is None and not _warned:
        logger.warning("bubblewrap (bwrap) is not usable: model-written code runs under resource limits and a "
                       "network block only; install bubblewrap (apt install bubblewrap) for namespaces and a "
                       "private file system")
        _warned = True
    scratch = tempfile.mkdtemp(prefix="phi4-sandbox-")
    root = os.geteuid() == 0
    try:
        if bwrap is not None:
            interpreter = _interpreter()
            uid = SAMPLE_UID_BASE + next(_uids) % 1_000_000 if root and _world_accessible(interpreter) else None
            command = _bwrap_command(bwrap, interpreter, scratch)
            env: dict[str, str] = {}
            isolation = "bubblewrap"
            restrict = _limit
            source = program
        else:
            interpreter = _interpreter()
            uid = NOBODY if root and _world_accessible(interpreter) else None
            command = [interpreter, "-I", os.path.join(scratch, "program.py")]
            env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "PYTHONDONTWRITEBYTECODE": "1",
                   "LANG": "C.UTF-8"}
            isolation = "limits"
            restrict = _limit_without_namespaces
            source = NO_SOCKETS + program
        with open(os.path.join(scratch, "program.py"), "w", encoding="utf-8") as handle:
            handle.write(source)
        if uid is not None:
            os.chown(scratch, uid, uid)
            os.chown(os.path.join(scratch, "program.py"), uid, uid)
        return _run(command, env, scratch, limits, uid, restrict, marker, isolation)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(command: list[str], env: dict[str, str], cwd: str, limits: SandboxLimits, uid: int | None, restrict,  # noqa: ANN001
         marker: str | None, isolation: str) -> ExecutionResult:
    started = time.monotonic()
    try:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=lambda: restrict(limits, uid))  # noqa: PLW1509 - no threads in the child
    except OSError as exc:  # EAGAIN and the like: this sample fails, the run goes on
        return ExecutionResult("error", None, None, 0.0, f"could not start the sandbox: {exc}", isolation)
    output = bytearray()
    status = None
    selector = selectors.DefaultSelector()
    assert process.stdout is not None
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = started + limits.timeout_seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"
                break
            if not selector.select(timeout=min(left, 0.05)):
                if process.poll() is not None:  # exited: take what it wrote last, without waiting for a child
                    status = _drain(process.stdout.fileno(), output, limits.max_output_bytes)  # that holds the pipe
                    break
                continue
            chunk = os.read(process.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            output += chunk
            if len(output) > limits.max_output_bytes:
                status = "output_limit"
                break
    finally:
        selector.close()
        _kill_group(process)
    seconds = time.monotonic() - started
    code = process.returncode
    if status is None:
        status = "completed" if marker is None and code == 0 or marker is not None and marker.encode() in output \
            else "failed"
    text = bytes(output[-4000:]).decode("utf-8", "replace")
    if marker is not None:
        text = text.replace(marker, "<tests completed>")
    return ExecutionResult(status, code if code is None or code >= 0 else None,
                           -code if code is not None and code < 0 else None, round(seconds, 3), text, isolation)


def _drain(fd: int, output: bytearray, cap: int) -> str | None:
    """Read what is already in the pipe, never blocking (another process may hold its write end open)."""
    os.set_blocking(fd, False)
    try:
        while len(output) <= cap:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            output += chunk
    except BlockingIOError:
        return None
    return "output_limit"


def new_marker() -> str:
    """A string the harness prints after the tests, which the program cannot guess."""
    return f"phi4-tests-completed-{secrets.token_hex(16)}"


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the program and everything it started (they share its session's process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if process.stdout is not None:
        process.stdout.close()
    process.wait()
