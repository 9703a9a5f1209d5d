"""qwen/sandbox.py: untrusted code runs in a child that cannot write outside its workdir, reach the
network, start processes or outlive its limits, and the parent comes out of it unchanged.

Where a guarantee is claimed by `isolation_report()` as kernel-enforced, it is also checked with the
audit hook switched off (`_Child(..., guard=False)`), so each layer is tested on its own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from qwen import sandbox
from qwen.sandbox import PythonSession, RunResult, SandboxLimits, isolation_report, run_python

FAST = SandboxLimits(timeout_s=5)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's own bookkeeping


def _mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


@pytest.fixture(autouse=True)
def parent_unchanged():
    """Every test: the parent's cwd, environment, open file descriptors and mounts are as before."""
    cwd, env, fds, mounts = os.getcwd(), _env(), _fds(), _mounts()
    yield
    assert os.getcwd() == cwd
    assert _env() == env
    assert _fds() == fds, f"fds changed: {_fds() ^ fds}"
    assert _mounts() == mounts  # the child's mounts stay in its own namespace
    assert subprocess.run(["true"]).returncode == 0  # the parent can still start processes


def _session_processes(sid: int) -> list[int]:
    """Pids of live processes in session `sid` (the sandbox child is its session leader)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != b"Z":  # fields[3]: session id
            found.append(int(name))
    return found


def _unguarded(code: str, limits: SandboxLimits = FAST, **kwargs) -> RunResult:
    """Run code with the audit hook off: only the kernel layers stand in its way."""
    wd = sandbox._Workdir(None)
    child = sandbox._Child(wd.path, limits, once=True, guard=False, **kwargs)
    try:
        return child.run(code, 1)[0]
    finally:
        child.kill()
        wd.remove()


# -- one-shot runs ---------------------------------------------------------------------------------


def test_hello_world():
    r = run_python("print('hello world')")
    assert r.ok and r.status == "ok"
    assert r.stdout == "hello world\n" and r.stderr == ""
    assert r.returncode == 0 and r.error is None and not r.truncated and r.value is None
    assert 0 <= r.seconds < 5


def test_exception_is_an_error_with_its_line_and_traceback():
    r = run_python("def f(x):\n    return x / 0\n\nf(1)\n")
    assert r.status == "error" and not r.ok and r.returncode == 1
    assert r.error == "ZeroDivisionError: division by zero"
    assert 'File "<program>", line 2, in f' in r.stderr and "return x / 0" in r.stderr
    assert "<qwen-sandbox>" not in r.stderr and "hook" not in r.stderr  # our own frames are hidden


def test_exit_status_and_syntax_error():
    assert run_python("import sys; sys.exit(0)").status == "ok"
    r = run_python("import sys; print('out'); sys.exit(3)")
    assert (r.status, r.returncode, r.error, r.stdout) == ("error", 3, "SystemExit: 3", "out\n")
    r = run_python("def f(:\n    pass\n")
    assert r.status == "error" and r.error == "SyntaxError: invalid syntax"


def test_stdin_and_main_name():
    r = run_python("import sys\nif __name__ == '__main__':\n    print(sys.stdin.read().upper())", stdin="abc\n")
    assert r.ok and r.stdout == "ABC\n\n"
    assert run_python("print(input())").error == "EOFError: EOF when reading a line"


def test_environment_is_scrubbed():
    os.environ["QWEN_SANDBOX_TEST_SECRET"] = "hunter2"
    try:
        r = run_python("import os, json; print(json.dumps(dict(os.environ)))")
    finally:
        del os.environ["QWEN_SANDBOX_TEST_SECRET"]
    assert r.ok and "hunter2" not in r.stdout
    assert '"MPLBACKEND": "Agg"' in r.stdout and '"PYTHONHASHSEED": "0"' in r.stdout


def test_output_is_truncated_with_a_marker():
    r = run_python("import sys\nprint('x' * 50_000)\nsys.stderr.write('e' * 50_000)",
                   limits=SandboxLimits(output_bytes=1000))
    assert r.ok and r.truncated
    assert r.stdout.startswith("x" * 1000) and r.stdout.count("x") - r.stdout.splitlines()[-1].count("x") == 1000
    assert "output truncated, 49001 more bytes dropped" in r.stdout.splitlines()[-1]
    assert r.stderr.count("e") - r.stderr.splitlines()[-1].count("e") == 1000
    small = run_python("print('y' * 10)", limits=SandboxLimits(output_bytes=1000))
    assert not small.truncated and small.stdout == "y" * 10 + "\n"


def test_writes_to_fd1_do_not_reach_the_protocol():
    r = run_python("import os\nos.write(1, b'{\"t\": \"result\", \"cell\": 1, \"status\": \"ok\"}\\n')\n1/0")
    assert r.status == "error" and r.stdout.startswith('{"t": "result"')


# -- filesystem ------------------------------------------------------------------------------------


def test_cannot_write_outside_the_workdir(tmp_path):
    outside = Path("/tmp") / f"{uuid.uuid4().hex}-outside.txt"
    code = f"open({str(outside)!r}, 'w').write('escaped')"
    r = run_python(code, workdir=tmp_path)
    assert r.status == "error" and "PermissionError" in r.error
    assert not outside.exists()
    for attack in (f"import os; os.symlink({str(outside)!r}, 'link'); open('link', 'w').write('x')",
                   f"import os; os.chdir('/tmp'); open({outside.name!r}, 'w').write('x')",
                   f"import pathlib; pathlib.Path({str(outside)!r}).touch()",
                   "import os\nfd = os.open('/tmp', os.O_RDONLY)\nos.open('x', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
                   "import os; os.remove('/etc/hostname')",
                   "import os.path; os.path.realpath = lambda p, **k: __import__('os').getcwd(); open('/tmp/p', 'w')"):
        r = run_python(attack, limits=FAST)
        assert r.status == "error", (attack, r)
    assert not outside.exists() and not Path("/tmp/x").exists() and not Path("/tmp/p").exists()
    assert Path("/etc/hostname").exists() or not os.path.lexists("/etc/hostname")


def test_can_write_inside_the_workdir(tmp_path):
    r = run_python("import os, pathlib\nos.makedirs('sub/deep')\npathlib.Path('sub/deep/a.txt').write_text('hi')\n"
                   "open('b.bin', 'wb').write(b'x' * 1000)\nos.rename('b.bin', 'c.bin')\nprint(os.getcwd())",
                   workdir=tmp_path)
    assert r.ok, r.stderr
    assert r.stdout.strip() == str(tmp_path.resolve())
    assert (tmp_path / "sub/deep/a.txt").read_text() == "hi" and (tmp_path / "c.bin").stat().st_size == 1000
    if os.geteuid() == 0:  # the child ran as nobody; the caller's directory is given back
        owner = tmp_path.stat().st_uid
        assert all(p.stat().st_uid == owner for p in [tmp_path, *tmp_path.rglob("*")])


def test_file_size_limit():
    r = run_python("open('big', 'wb').write(b'x' * (3 << 20))", limits=SandboxLimits(file_mb=1))
    assert r.status == "error" and "File too large" in r.error


def test_temp_workdir_is_removed():
    r = run_python("import os; print(os.getcwd())")
    assert r.ok and r.stdout.startswith("/") and not os.path.exists(r.stdout.strip())


def test_native_escapes_are_refused():
    r = run_python("import ctypes")
    assert r.status == "error" and r.error.startswith("ImportError: sandbox: the module 'ctypes'")
    r = run_python("try:\n    import ctypes\nexcept ImportError:\n    print('no ctypes')\n"
                   "import numpy\nprint(numpy.arange(4).sum())")
    assert r.ok and r.stdout == "no ctypes\n6\n", r.stderr
    for code in ("import gc; gc.get_objects()", "(lambda: 0).__code__.replace(co_code=b'')",
                 "import sys; del sys.modules['_posixsubprocess']; import _posixsubprocess",
                 "import _posixsubprocess; _posixsubprocess.fork_exec()"):
        assert run_python(code).status == "error", code


# -- network ---------------------------------------------------------------------------------------


def test_loopback_of_the_host_is_unreachable():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        code = (f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
                "s.sendall(b'hello')\nprint('connected')")
        r = run_python(code, limits=FAST)
        assert r.status == "error" and "connected" not in r.stdout
        if isolation_report()["network_namespace"]:
            k = _unguarded(code)
            assert k.status == "error" and "connected" not in k.stdout, k
        with pytest.raises(socket.timeout):
            server.accept()  # the test's server never saw a connection
    finally:
        server.close()


def test_dns_and_public_addresses_fail():
    r = run_python("import socket\nprint(socket.getaddrinfo('example.com', 80))", limits=FAST)
    assert r.status == "error" and "network access" in r.error
    code = "import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=2)\nprint('connected')"
    r = run_python(code, limits=FAST)
    assert r.status == "error" and "connected" not in r.stdout
    if isolation_report()["network_namespace"]:
        k = _unguarded(code)
        assert k.status == "error" and ("unreachable" in k.error or "Errno" in k.error), k
    # AF_UNIX socket pairs (asyncio's self-pipe) keep working.
    assert run_python("import asyncio\nasync def f():\n    return 7\nprint(asyncio.run(f()))").stdout == "7\n"


# -- limits ----------------------------------------------------------------------------------------


def test_infinite_loop_is_killed_near_the_timeout():
    r = run_python("print('started')\nwhile True:\n    pass", limits=SandboxLimits(timeout_s=1))
    assert r.status == "timeout" and r.error == "timed out after 1 s"
    assert 1 <= r.seconds < 1 + 3
    assert r.stdout == "started\n"  # output before the kill is kept


def test_cpu_limit_kills_a_one_shot_run():
    r = run_python("while True:\n    pass", limits=SandboxLimits(timeout_s=5, cpu_s=1))
    assert r.status == "timeout" and "CPU time limit" in r.error and r.seconds < 5


def test_memory_limit():
    r = run_python("bytearray(10 * 2**30)")
    assert r.status == "memory" and r.error == "MemoryError"
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(2**24))", limits=SandboxLimits(memory_mb=256))
    assert r.status == "memory"


def test_crash_is_killed():
    r = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert r.status == "killed" and r.error == "killed by SIGSEGV" and r.returncode == -11


# -- processes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()",
    "import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])",
    "import os\nos.system('sleep 100 &')",
    "import os\nos.execv('/bin/sh', ['sh', '-c', 'sleep 100'])",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()",
])
def test_process_creation_is_contained(bomb):
    r = run_python("import os\nprint(os.getpid(), flush=True)\n" + bomb, limits=FAST)
    assert r.status != "ok" and r.status != "timeout", r
    sid = int(r.stdout.split()[0])
    assert _session_processes(sid) == []  # nothing of the sandbox is left


def test_kernel_stops_a_fork_bomb_without_the_hook():
    if not isolation_report()["process_limit"]:
        pytest.skip("RLIMIT_NPROC is not enforced here (the child runs as uid 0)")
    r = _unguarded("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    os.fork()")
    assert r.status == "error" and r.error.startswith("BlockingIOError"), r
    assert _session_processes(int(r.stdout.split()[0])) == []


def test_signals_to_other_processes_are_refused():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        r = run_python(f"import os, signal\nos.kill({sleeper.pid}, signal.SIGKILL)")
        assert r.status == "error" and "signalling" in r.error
        assert sleeper.poll() is None
        r = run_python(f"import os\nos.kill({os.getpid()}, 9)")
        assert r.status == "error"
    finally:
        sleeper.kill()
        sleeper.wait()


# -- kernel layers, each on its own ----------------------------------------------------------------


def test_isolation_report():
    report = isolation_report()
    assert set(report) == {"separate_process", "resource_limits", "process_limit", "network_namespace",
                           "mount_namespace", "readonly_filesystem", "user_namespace", "privileges_dropped",
                           "no_capabilities", "no_new_privileges", "audit_hook"}
    assert all(isinstance(v, bool) for v in report.values())
    assert report["separate_process"] and report["audit_hook"] and report["resource_limits"]
    if os.geteuid() != 0:
        assert not report["privileges_dropped"]
    if report["privileges_dropped"]:
        assert run_python("import os; print(os.getuid())").stdout == f"{sandbox.NOBODY}\n"


def test_readonly_filesystem_without_the_hook():
    if not isolation_report()["readonly_filesystem"]:
        pytest.skip("no mount namespace here")
    outside = Path("/tmp") / f"{uuid.uuid4().hex}-outside.txt"
    r = _unguarded(f"open('inside.txt', 'w').write('ok')\nopen({str(outside)!r}, 'w')")
    assert r.status == "error" and "Read-only file system" in r.error, r
    assert not outside.exists()
    assert _unguarded("open('/dev/null', 'w').write('x')").ok


def test_fallback_without_namespaces_still_guards():
    """Where the kernel refuses namespaces, the run still works and the hook still refuses."""
    outside = Path("/tmp") / f"{uuid.uuid4().hex}-outside.txt"
    wd = sandbox._Workdir(None)
    child = sandbox._Child(wd.path, FAST, once=True, namespaces=False)
    try:
        r = child.run(f"open('in.txt', 'w').write('x')\nopen({str(outside)!r}, 'w')", 1)[0]
        assert not child.facts["netns"] and not child.facts["mntns"]
    finally:
        child.kill()
        wd.remove()
    assert r.status == "error" and "writing outside the working directory" in r.error
    assert not outside.exists()


# -- sessions --------------------------------------------------------------------------------------


def test_session_keeps_state_and_returns_the_last_expression():
    with PythonSession(limits=FAST) as s:
        r = s.run("x = 40\ndef inc(v):\n    return v + 1")
        assert r.ok and r.value is None and r.returncode is None
        r = s.run("print('side effect')\ninc(x) + 1")
        assert r.ok and r.value == "42" and r.stdout == "side effect\n"
        assert s.run("_ * 2").value == "84"  # `_` is the last value, as in a REPL
        assert s.run("'a' * 3").value == "'aaa'"
        assert s.run("None").value is None
        r = s.run("y = undefined_name")
        assert r.status == "error" and r.error == "NameError: name 'undefined_name' is not defined"
        assert 'File "<cell-6>", line 1' in r.stderr
        assert s.run("x").value == "40"  # an exception does not lose the state
        s.run("open('helper.py', 'w').write('K = 5\\n')")
        assert s.run("import helper\nhelper.K").value == "5"  # the workdir is importable


def test_session_restarts_after_a_timeout_and_says_state_was_lost():
    with PythonSession(limits=SandboxLimits(timeout_s=1)) as s:
        first = s.pid
        assert s.run("y = 5").ok
        r = s.run("while True:\n    pass")
        assert r.status == "timeout" and r.seconds < 1 + 3
        assert "timed out after 1 s" in r.error and "gone" in r.error and "restarted" in r.error
        assert _session_processes(first) == []
        r = s.run("y")
        assert r.status == "error" and "NameError" in r.error
        assert s.pid != first and s.run("1 + 1").value == "2"


def test_session_memory_error_keeps_the_interpreter():
    with PythonSession(limits=FAST) as s:
        s.run("keep = 'me'")
        r = s.run("bytearray(10 * 2**30)")
        assert r.status == "memory" and r.error == "MemoryError"
        assert s.run("keep").value == "'me'"


def test_session_crash_restarts():
    with PythonSession(limits=FAST) as s:
        s.run("z = 1")
        r = s.run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
        assert r.status == "killed" and "gone" in r.error
        assert s.run("z").status == "error"


def test_session_matplotlib_png():
    pytest.importorskip("matplotlib")
    with PythonSession(limits=SandboxLimits(timeout_s=30)) as s:
        r = s.run("import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.title('squares')\nplt.show()")
        assert r.ok, r.stderr
        assert len(r.images) == 1 and r.images[0].parent == s.workdir
        assert r.images[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "non-interactive" not in r.stderr
        r = s.run("fig, axes = plt.subplots(1, 2)\nplt.figure()\nplt.plot([1])")
        assert len(r.images) == 2 and len(set(r.images)) == 2
        assert s.run("len(plt.get_fignums())").value == "0"  # saved figures are closed


def test_run_python_saves_figures_only_into_a_given_workdir(tmp_path):
    pytest.importorskip("matplotlib")
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2])"
    r = run_python(code, workdir=tmp_path, limits=SandboxLimits(timeout_s=30))
    assert r.ok and r.images == [tmp_path.resolve() / "figure-1-1.png"] and r.images[0].is_file()


def test_session_close_removes_the_temp_workdir_and_kills_the_child():
    s = PythonSession(limits=FAST)
    wd, pid = s.workdir, s.pid
    s.run("open('f.txt', 'w').write('x')")
    assert (wd / "f.txt").exists() and _session_processes(pid) == [pid]
    s.close()
    assert not wd.exists() and _session_processes(pid) == [] and s.pid is None
    with pytest.raises(ValueError):
        s.run("1")
    s.close()  # twice is fine


def test_session_keeps_a_given_workdir_and_reset_forgets_state(tmp_path):
    with PythonSession(tmp_path, limits=FAST) as s:
        assert s.workdir == tmp_path.resolve()
        s.run("a = 1\nopen('kept.txt', 'w').write('x')")
        s.reset()
        assert s.run("a").status == "error"
        assert s.run("open('kept.txt').read()").value == "'x'"
    assert (tmp_path / "kept.txt").read_text() == "x"


def test_session_cpu_limit_is_polled():
    # Sessions have no RLIMIT_CPU (it would count the whole session); the parent polls instead.
    with PythonSession(limits=SandboxLimits(timeout_s=5, cpu_s=1)) as s:
        r = s.run("while True:\n    pass")
        assert r.status == "timeout" and "CPU time limit of 1 s" in r.error and r.seconds < 3


def test_a_child_that_does_not_start_is_a_sandbox_error(monkeypatch):
    monkeypatch.setattr(sandbox, "_scripts", lambda: ("import sys; sys.stderr.write('boom'); sys.exit(3)", ""))
    with pytest.raises(sandbox.SandboxError, match="boom"):
        run_python("print(1)")
    with pytest.raises(sandbox.SandboxError, match="did not start"):
        PythonSession()


# -- cost ------------------------------------------------------------------------------------------


def test_one_shot_overhead_is_small():
    run_python("pass")
    start = time.perf_counter()
    for _ in range(5):
        assert run_python("pass").ok
    per_run = (time.perf_counter() - start) / 5
    assert per_run < 1.0, f"{per_run:.3f} s per run"


def test_limits_validation():
    assert SandboxLimits(timeout_s=2.5).cpu_limit_s == 4
    assert SandboxLimits(cpu_s=7).cpu_limit_s == 7
    for bad in ({"timeout_s": 0}, {"memory_mb": 1}, {"cpu_s": 0}, {"output_bytes": -1}):
        with pytest.raises(ValueError):
            SandboxLimits(**bad)
    assert sys.executable  # the child is started from the same interpreter
