"""The HumanEval sandbox against hostile programs, run through the real sandbox (bubblewrap; `.ci/run`
installs it). Each test is one way a model-written program could hurt the host, another sample or the
score, and checks that it cannot."""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from phi4.eval.sandbox import ExecutionResult, SandboxLimits, bubblewrap, new_marker, run_python
from phi4.eval.tasks import TASKS, Scoring

pytestmark = pytest.mark.skipif(bubblewrap() is None, reason="bubblewrap (bwrap) is not usable on this machine")
LIMITS = SandboxLimits(timeout_seconds=10.0, cpu_seconds=10)


def run_marked(program: str, limits: SandboxLimits = LIMITS) -> ExecutionResult:
    marker = new_marker()
    return run_python(f"{program}\nprint({marker!r}, flush=True)\n", limits, marker=marker)


def host_processes_with(token: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if token in line and "ps -eo" not in line]


def test_a_clean_program_passes_and_its_record_says_how_it_ran() -> None:
    result = run_marked("print('hello')")
    assert result.passed and result.status == "completed" and result.exit_code == 0 and result.signal is None
    assert result.isolation == "bubblewrap" and result.seconds > 0 and "hello" in result.output


def test_exiting_before_the_tests_is_not_a_pass() -> None:
    result = run_marked("import sys\nsys.exit(0)")
    assert not result.passed and result.status == "failed" and result.exit_code == 0


def test_a_humaneval_answer_that_exits_early_scores_zero() -> None:
    sample = TASKS["humaneval"].load(None).samples[0]
    cheat = "```python\ndef f():\n    import sys; sys.exit(0)\nimport sys\nsys.exit(0)\n```"
    record = TASKS["humaneval"].score(sample, cheat, Scoring())
    assert record["score"] == 0.0 and record["status"] == "failed" and record["exit_code"] == 0


def test_kill_minus_one_does_not_reach_another_sample() -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        victim = pool.submit(run_marked, "import time\ntime.sleep(2.5)")
        time.sleep(0.5)
        killer = pool.submit(run_marked, "import os, signal, time\nfor _ in range(20):\n"
                                         "    try:\n        os.kill(-1, signal.SIGKILL)\n    except OSError:\n"
                                         "        pass\n    time.sleep(0.1)")
        assert victim.result().passed, victim.result()
        killer.result()


def test_another_samples_scratch_directory_is_out_of_reach() -> None:
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "phi4-sandbox-*")))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        owner = pool.submit(run_marked, "open('hidden_tests.py', 'w').write('assert secret')\n"
                                        "import time\ntime.sleep(3)")
        deadline = time.monotonic() + 10
        while not (scratch := set(glob.glob(os.path.join(tempfile.gettempdir(), "phi4-sandbox-*"))) - before):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        path = os.path.join(scratch.pop(), "hidden_tests.py")
        prying = pool.submit(run_marked, f"import glob, os\nprint(glob.glob('/tmp/*'), os.path.exists({path!r}))\n"
                                         f"open({path!r}, 'w').write('overwritten')")
        assert not prying.result().passed and "[] False" in prying.result().output
        assert owner.result().passed


def test_one_samples_process_limit_does_not_fail_another_or_the_run() -> None:
    spawner = ("import subprocess, sys\nprocs = []\nfor _ in range(64):\n    try:\n"
               "        procs.append(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3)']))\n"
               "    except OSError as exc:\n        print('refused:', exc.errno)\n        break")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        greedy = [pool.submit(run_marked, spawner) for _ in range(2)]
        time.sleep(0.5)
        modest = pool.submit(run_marked, "import subprocess, sys\n"
                                         "print(subprocess.run([sys.executable, '-c', 'print(2 + 2)'], "
                                         "capture_output=True, text=True).stdout)")
        assert modest.result().passed and "4" in modest.result().output
        assert all("refused: 11" in g.result().output for g in greedy)  # EAGAIN inside its own sample only


def test_a_setsid_daemon_dies_with_its_sample() -> None:
    token = f"phi4daemon{os.getpid()}x{time.monotonic_ns()}"
    result = run_marked("import subprocess, sys\n"
                        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {token!r}], "
                        "start_new_session=True)")
    assert result.passed
    deadline = time.monotonic() + 10
    while host_processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host_processes_with(token) == []


def test_host_unix_sockets_are_unreachable(tmp_path: Path) -> None:
    path = tmp_path / "host.sock"
    named, abstract = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    abstract_name = f"\0phi4-host-{os.getpid()}"
    with named, abstract:
        named.bind(str(path))
        abstract.bind(abstract_name)
        for listener in (named, abstract):
            listener.listen(1)
            listener.settimeout(0.5)
        program = ("import socket, subprocess, sys\nfor address in (%r, %r):\n"
                   "    s = socket.socket(socket.AF_UNIX)\n    try:\n        s.connect(address)\n"
                   "        print('connected', address)\n    except OSError as exc:\n        print('refused')\n"
                   % (str(path), abstract_name))
        result = run_marked(f"import subprocess, sys\nprint(subprocess.run([sys.executable, '-c', {program!r}], "
                            "capture_output=True, text=True).stdout)")
        assert result.passed and "connected" not in result.output and result.output.count("refused") == 2
        for listener in (named, abstract):
            with pytest.raises(TimeoutError):
                listener.accept()


def test_tmp_and_dev_shm_are_private_and_do_not_persist() -> None:
    token = f"phi4-persist-{os.getpid()}-{time.monotonic_ns()}"
    writer = run_marked(f"open('/tmp/{token}', 'w').write('x')\nopen('/dev/shm/{token}', 'w').write('x')")
    assert writer.passed
    reader = run_marked(f"import os\nprint(os.path.exists('/tmp/{token}'), os.path.exists('/dev/shm/{token}'))")
    assert reader.passed and "False False" in reader.output
    assert not os.path.exists(f"/tmp/{token}") and not os.path.exists(f"/dev/shm/{token}")


def test_other_processes_command_lines_are_invisible() -> None:
    secret = f"sk-phi4-secret-{time.monotonic_ns()}"
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--api-key", secret])
    try:
        result = run_marked("import glob\nfound = []\nfor path in glob.glob('/proc/*/cmdline'):\n    try:\n"
                            "        found.append(open(path, 'rb').read())\n    except OSError:\n        pass\n"
                            f"print(len(found), any({secret.encode()!r} in c for c in found))\n"
                            f"import os\nprint('host pid visible:', os.path.exists('/proc/{server.pid}/cmdline') and "
                            f"{secret.encode()!r} in open('/proc/{server.pid}/cmdline', 'rb').read())")
        assert result.passed and " False" in result.output.splitlines()[0]
        assert "host pid visible: False" in result.output
    finally:
        server.kill()
        server.wait()


def test_a_flood_of_output_is_cut_without_filling_the_harness_memory() -> None:
    probe = ("import resource, json\nfrom phi4.eval.sandbox import run_python, SandboxLimits\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "r = run_python(\"import sys\\nchunk = 'x' * (1 << 20)\\nfor _ in range(1024):\\n"
             "    sys.stdout.write(chunk)\\n\", SandboxLimits(timeout_seconds=30))\n"
             "growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
             "print(json.dumps([r.status, len(r.output), growth]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    status, kept, growth_kib = json.loads(out.stdout.strip().splitlines()[-1])
    assert status == "output_limit" and kept <= 4000
    assert growth_kib < 64 * 1024, "1 GiB of output must not be held in memory"


def test_a_child_holding_stdout_open_does_not_turn_a_pass_into_a_timeout() -> None:
    result = run_marked("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; "
                        "time.sleep(30)'])", SandboxLimits(timeout_seconds=5.0))
    assert result.passed and result.status == "completed"


def test_an_endless_loop_times_out_and_the_signal_is_recorded() -> None:
    result = run_marked("while True:\n    pass", SandboxLimits(timeout_seconds=1.0))
    assert result.status == "timeout" and result.signal == 9 and result.exit_code is None


def test_a_fork_bomb_is_contained() -> None:
    token = f"phi4bomb{time.monotonic_ns()}"
    result = run_marked(f"import os\n{token} = 1\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                        "        pass", SandboxLimits(timeout_seconds=2.0))
    assert not result.passed
    assert run_marked("print('still works')").passed


def test_a_memory_hog_is_refused() -> None:
    result = run_marked("blob = bytearray(8 << 30)\nprint('allocated')")
    assert not result.passed and "allocated" not in result.output


def test_rm_rf_cannot_touch_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "precious.txt").write_text("keep me")
    monkeypatch.setenv("HOME", str(home))
    run_marked(f"import os, shutil\nshutil.rmtree(os.path.expanduser('~'), ignore_errors=True)\n"
               f"os.system('rm -rf ~ {home} /usr 2>/dev/null')\nshutil.rmtree({str(home)!r}, ignore_errors=True)")
    assert (home / "precious.txt").read_text() == "keep me" and os.path.exists("/usr/bin")


def test_the_network_is_unreachable() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        result = run_marked(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                            "s.sendall(b'leak')\nprint('connected')")
        assert not result.passed and "connected" not in result.output
        with pytest.raises(TimeoutError):
            listener.accept()


def test_concurrent_samples_all_keep_their_last_output() -> None:
    """A program that prints and exits at once must not lose its output to the exit (a race under load)."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: run_marked(f"print(sum(range({n})))"), range(48)))
    assert all(r.passed and str(sum(range(n))) in r.output for n, r in enumerate(results))
