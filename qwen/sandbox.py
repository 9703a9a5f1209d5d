"""Run untrusted, model-written Python code in a separate, locked-down process.

Two users: HumanEval scoring in `qwen eval` runs each program once (`run_python`), and the
code-interpreter tool of ReAct agents keeps a notebook-like interpreter alive across calls
(`PythonSession`: globals survive, the last expression's repr comes back, matplotlib figures come
back as PNG files). Only the standard library is used here; matplotlib is optional in the child.

How a child starts: the parent spawns `sys.executable -I -S -c <stage 1>` in a new session
(its own process group) with a scrubbed environment, the workdir as cwd, and pipes for the code's
stdin, stdout and stderr, for commands (parent -> child) and for results (child -> parent, a
dedicated fd, so code printing to fd 1 cannot corrupt the protocol). Stage 1 is trusted code that
sets up the kernel-side isolation with ctypes and then `execve`s stage 2: a fresh interpreter
(`-s -B`, ctypes never loaded) that installs an audit hook and only then runs user code.

Layers. `isolation_report()` says which are active on this machine; each is used where the kernel
allows it and skipped silently where it does not.

Hard guarantees (enforced by the kernel or the parent; the child cannot undo them):
  * A separate process in its own session: the parent's memory, cwd, environment and file
    descriptors are never touched; on timeout or close the whole process group gets SIGKILL.
  * Wall-clock timeout and output caps, enforced by the parent.
  * Resource limits, set before user code runs: RLIMIT_AS (`memory_mb`), RLIMIT_FSIZE (`file_mb`),
    RLIMIT_NOFILE, RLIMIT_CORE=0, RLIMIT_CPU for one-shot runs (a session is polled by the parent
    instead, since the rlimit would count the whole session), and RLIMIT_NPROC=0 whenever the
    child's uid is not 0: then it can create neither processes nor threads (a fork bomb fails at
    its first fork). Linux exempts uid 0 from RLIMIT_NPROC.
  * A network namespace (`unshare(CLONE_NEWNET)`; as a normal user inside a new user namespace):
    the child's only interface is a loopback that is down, so even the host's 127.0.0.1 is
    unreachable.
  * A mount namespace in which every mount is read-only except a bind mount of the workdir:
    nothing outside the workdir can be written, whatever the uid (device nodes such as /dev/null
    still work). Needs root or user namespaces.
  * As root: `PR_SET_NO_NEW_PRIVS`, then uid/gid 65534 (nobody), with the workdir chown'd to it
    and given back to its owner afterwards when the caller supplied it. When the interpreter lives
    under a directory nobody may not enter (pyenv under /root), stage 1 mounts a tmpfs over that
    directory in the child's mount namespace and binds back only the paths the interpreter needs.
    Where the uid cannot be dropped, the capability bounding set is emptied instead.

Best effort (a Python audit hook, `sys.addaudithook`, installed before user code runs). It refuses:
  * sockets other than AF_UNIX, and connect/bind/sendto/sendmsg/DNS look-ups (unless `network`);
  * process creation and signals to other processes: os.fork, os.exec*, os.posix_spawn, os.system,
    subprocess (and `_posixsubprocess.fork_exec`, which has no audit event, is replaced by a stub);
  * opening files for writing, and remove/rename/mkdir/rmdir/chmod/chown/link/symlink/utime/
    truncate/xattr, outside the workdir, on real paths (symlinks and `dir_fd` resolved by functions
    captured when the hook is installed, so monkeypatching `os.path` or builtins changes nothing),
    and os.open of directories outside the workdir (which could serve as `dir_fd`);
  * importing ctypes, cffi, `_testcapi` and the like, every `ctypes.*` event, building code objects
    (`code.__new__`, except from `types.coroutine`), `gc.get_objects`/`get_referrers` (which would
    reach the hook's state), and new subinterpreters (which would start without the hook).
This stops ordinary and accidental misuse, but it is not a security boundary: as CPython's
documentation says, code that corrupts memory (crafted bytecode loaded from a .pyc, a bug in a C
extension) can get past audit hooks; a path object whose `__fspath__` answers differently on each
call can race the check; os.mkfifo and os.mknod have no audit event. The hook does not restrict
reading (the kernel's file permissions do), and a malicious child could forge result messages on
its own result pipe. Run as root (as the test machines do) or with user namespaces enabled to get
the kernel layers.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PythonSession", "RunResult", "SandboxError", "SandboxLimits", "isolation_report", "run_python"]

# The uid/gid a root parent drops the child to.
NOBODY = 65534
# Stage 1 + stage 2 start in ~0.1 s; this only guards against a child that never comes up.
STARTUP_TIMEOUT_S = 30.0
# Largest result message the parent accepts from a child (value reprs are capped before that).
MAX_MESSAGE_BYTES = 8 << 20
NOFILE_LIMIT = 256
STATUSES = ("ok", "error", "timeout", "memory", "killed")


class SandboxError(RuntimeError):
    """The sandbox itself failed (the child did not start, or broke the protocol): not the code's fault."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run (`run_python`) or for each `PythonSession.run` call."""

    timeout_s: float = 10.0  # wall clock per run
    memory_mb: int = 1024  # address space (RLIMIT_AS) of the child
    cpu_s: int | None = None  # default: ceil(timeout_s) + 1
    output_bytes: int = 20_000  # stdout and stderr each; the rest is dropped, `truncated` set, a marker line appended
    file_mb: int = 64  # largest file the code may write (RLIMIT_FSIZE)
    network: bool = False

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxLimits.timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 64:
            raise ValueError(f"SandboxLimits.memory_mb must be >= 64 (Python needs that), got {self.memory_mb}")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ValueError(f"SandboxLimits.cpu_s must be >= 1 or None, got {self.cpu_s}")
        if self.output_bytes < 0 or self.file_mb < 0:
            raise ValueError("SandboxLimits.output_bytes and file_mb must be >= 0")

    @property
    def cpu_limit_s(self) -> int:
        """The CPU-seconds limit actually applied."""
        return self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1


@dataclass
class RunResult:
    """What one run produced."""

    status: str  # "ok" | "error" (exception/nonzero exit) | "timeout" | "memory" | "killed"
    stdout: str
    stderr: str  # holds the traceback for "error"
    returncode: int | None  # exit status of a one-shot child (negative: signal); None while a session lives on
    seconds: float  # wall time of the run, interpreter start-up excluded
    truncated: bool  # stdout or stderr went over `output_bytes`
    value: str | None = None  # PythonSession only: repr of the last expression, like a notebook
    images: list[Path] = field(default_factory=list)  # PNGs of the matplotlib figures this run left open
    error: str | None = None  # one line: "ZeroDivisionError: division by zero", "timed out after 10 s", ...

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --------------------------------------------------------------------------------------------
# Child code. These functions never run in the parent: their source is sent to the child with
# `python -c`, so each imports what it needs and uses no module globals.
# --------------------------------------------------------------------------------------------


def _child_stage1() -> None:
    """Trusted set-up as the parent's user: namespaces, mounts, uid, rlimits; then exec stage 2."""
    import ctypes
    import json
    import os
    import resource
    import stat
    import sys

    cfg = json.loads(sys.argv[1])
    stage2 = sys.argv[2]
    CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x08000000, 0x10000000, 0x40000000
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
    MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
    MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
    PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
    flag_of = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
               "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME,
               "strictatime": MS_STRICTATIME}

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def check(ret: int) -> None:
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)))

    wd = cfg["workdir"]
    root = os.geteuid() == 0
    facts = {"netns": False, "mntns": False, "userns": False, "readonly": False, "dropped": False,
             "capbset_cleared": False}
    notes: list[str] = []
    net = 0 if cfg["network"] else CLONE_NEWNET

    # 1. Namespaces: the most we can get, falling back step by step.
    if root:
        attempts = [CLONE_NEWNS | CLONE_NEWIPC | net, CLONE_NEWNS | net, net]
    else:
        attempts = [CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWIPC | net, CLONE_NEWUSER | CLONE_NEWNS | net,
                    CLONE_NEWUSER | net]
    uid, gid = os.getuid(), os.getgid()
    for flags in attempts if cfg["namespaces"] else []:
        if flags in (0, CLONE_NEWUSER):
            break
        if libc.unshare(flags) != 0:
            continue
        if flags & CLONE_NEWUSER:
            # Map ourselves to ourselves, so files keep their owners and we stay non-root inside.
            # Without the map (some hardened kernels) access checks still use our real uid.
            try:
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as f:
                        f.write(text)
            except OSError as e:
                notes.append(f"user namespace without an id map: {e}")
            facts["userns"] = True
        facts["mntns"] = bool(flags & CLONE_NEWNS)
        facts["netns"] = bool(flags & CLONE_NEWNET)
        break
    # Before any mount: stop propagation, or (where / is shared, as under systemd) the mounts
    # below would appear in the parent's namespace too.
    can_mount = False
    if facts["mntns"]:
        try:
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            can_mount = True
        except OSError as e:
            notes.append(f"mount propagation not made private, no mounts done: {e}")

    # 2. Can the unprivileged uid reach the interpreter and the workdir?
    drop_uid, drop_gid = cfg["drop_to"]

    def allowed_bits(st: os.stat_result) -> int:
        if st.st_uid == drop_uid:
            return (st.st_mode >> 6) & 7
        if st.st_gid == drop_gid:
            return (st.st_mode >> 3) & 7
        return st.st_mode & 7

    def first_blocker(path: str) -> tuple[str, str] | None:
        """The first ancestor of `path` the dropped uid cannot enter, and the entry below it."""
        cur = "/"
        for name in [p for p in path.split("/") if p]:
            if not allowed_bits(os.stat(cur)) & 1:
                return cur, os.path.join(cur, name)
            cur = os.path.join(cur, name)
        return None

    needed = [p for p in cfg["needed"] if os.path.exists(p)]
    drop = False
    if root:
        drop = True
        try:
            for _ in range(8):
                blockers: dict[str, set[str]] = {}
                for p in needed + [wd]:
                    b = first_blocker(p)
                    if b:
                        blockers.setdefault(b[0], set()).add(b[1])
                if not blockers:
                    break
                if not can_mount:
                    raise OSError("no mount namespace to expose the interpreter in")
                for top, children in blockers.items():
                    # Cover the closed directory with an open tmpfs; bind back only what is needed.
                    fds = [(c, os.open(c, os.O_PATH | os.O_CLOEXEC)) for c in sorted(children)]
                    mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
                    for c, fd in fds:
                        if stat.S_ISDIR(os.fstat(fd).st_mode):
                            os.mkdir(c)
                        else:
                            os.close(os.open(c, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                        mount(f"/proc/self/fd/{fd}", c, None, MS_BIND | MS_REC)
                        os.close(fd)
            else:
                raise OSError("too many nested closed directories")
            for p in needed:
                bits = allowed_bits(os.stat(p))
                if first_blocker(p) or (bits & 5) != 5:
                    raise OSError(f"{p} is not readable by uid {drop_uid}")
        except OSError as e:
            drop = False
            notes.append(f"privileges not dropped: {e}")

    def chown_tree(owner: tuple[int, int]) -> None:
        for dirpath, dirnames, filenames in os.walk(wd):
            for path in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                os.lchown(path, *owner)

    if drop:
        try:
            chown_tree((drop_uid, drop_gid))
        except OSError as e:
            drop = False
            notes.append(f"privileges not dropped: cannot chown the workdir: {e}")
            try:
                chown_tree((os.getuid(), os.getgid()))
            except OSError:
                pass

    # 3. Everything read-only except a bind mount of the workdir.
    if can_mount:
        try:
            mount(wd, wd, None, MS_BIND | MS_REC)
            failed = []
            with open("/proc/self/mountinfo") as f:
                lines = f.read().splitlines()
            for line in lines:
                fields = line.split()
                point = fields[4]
                for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                    point = point.replace(esc, ch)
                if point == wd or point.startswith(wd.rstrip("/") + "/"):
                    continue
                # Keep the flags the mount has (a user namespace may not clear locked ones).
                flags = MS_REMOUNT | MS_BIND | MS_RDONLY
                for opt in fields[5].split(","):
                    flags |= flag_of.get(opt, 0)
                if libc.mount(None, enc(point), None, flags, None) != 0 and ctypes.get_errno() not in (2, 13):
                    failed.append(point)
            facts["readonly"] = not failed
            if failed:
                notes.append("could not remount read-only: " + " ".join(failed))
        except OSError as e:
            notes.append(f"mount set-up failed: {e}")
    os.chdir(wd)  # onto the bind mount: the old cwd is the read-only mount underneath

    # 4. Privileges.
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if drop:
        os.setgroups([])
        os.setgid(drop_gid)
        os.setuid(drop_uid)
        facts["dropped"] = os.getuid() == drop_uid
    elif root:
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                last = int(f.read())
        except OSError:
            last = 40
        dropped = [libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0 for cap in range(last + 1)]
        facts["capbset_cleared"] = all(dropped)

    # 5. Resource limits (after the uid change: lowering is always allowed, and RLIMIT_NPROC=0
    # set before setuid would make the exec below fail).
    def limit(res: int, value: int) -> None:
        soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))

    limit(resource.RLIMIT_AS, cfg["memory"])
    limit(resource.RLIMIT_FSIZE, cfg["file"])
    limit(resource.RLIMIT_NOFILE, cfg["nofile"])
    limit(resource.RLIMIT_CORE, 0)
    if cfg["cpu"] is not None:
        soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
        top = cfg["cpu"] + 1 if hard == resource.RLIM_INFINITY else min(cfg["cpu"] + 1, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (min(cfg["cpu"], top), top))
    if os.getuid() != 0:
        limit(resource.RLIMIT_NPROC, 0)

    msg = json.dumps({"t": "stage1", "facts": facts, "notes": notes}) + "\n"
    os.write(cfg["res_fd"], msg.encode())
    exe = cfg["python"]
    # Not -I: it would ignore PYTHONHASHSEED; the environment is ours anyway. The loader takes the
    # cwd ('') off sys.path (what -P does on 3.11+) so files in the workdir cannot shadow the stdlib.
    loader = ("import sys\nif '' in sys.path: sys.path.remove('')\n"
              "exec(compile(sys.argv[2], '<qwen-sandbox>', 'exec'))")
    os.execve(exe, [exe, "-s", "-B", "-c", loader, sys.argv[1], stage2], dict(os.environ))


def _child_guard(workdir: str, allow_network: bool) -> None:
    """Install the audit hook. Every name the hook uses is bound here, so user code that
    monkeypatches builtins or modules cannot change what the hook does."""
    import pathlib
    import posix
    import sys
    import types

    _type, _isinstance, _str, _bytes, _int = type, isinstance, str, bytes, int
    _str_add, _bytes_decode, _bytearray_decode = str.__add__, bytes.decode, bytearray.decode
    _startswith, _split, _rfind, _rpartition = str.startswith, str.split, str.rfind, str.rpartition
    _lstat, _stat, _readlink, _getcwd, _getpid = posix.lstat, posix.stat, posix.readlink, posix.getcwd, posix.getpid
    _fspath, _DirEntry, _reversed, _list = posix.fspath, posix.DirEntry, reversed, list
    _PermissionError, _ImportError = PermissionError, ImportError
    path_types = (pathlib.PosixPath, pathlib.PurePosixPath)
    protected = (pathlib.PurePath, pathlib.Path, pathlib.PosixPath, pathlib.PurePosixPath)
    wd = _str_add("", workdir)
    wd_prefix = wd + "/"
    o_write = posix.O_WRONLY | posix.O_RDWR | posix.O_APPEND | posix.O_CREAT | posix.O_TRUNC
    specials = ("/dev/null", "/dev/stdout", "/dev/stderr")
    blocked_modules = frozenset({
        "ctypes", "_ctypes", "_ctypes_test", "cffi", "_cffi_backend", "_testcapi", "_testinternalcapi",
        "_testbuffer", "_testmultiphase", "_testimportmultiple", "_testsinglephase", "_xxsubinterpreters",
        "_xxinterpchannels", "_posixsubprocess",
    })
    process_events = frozenset({
        "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
        "subprocess.Popen", "os.killpg", "pty.spawn",
    })
    socket_events = frozenset({
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname",
    })
    # event -> ((path index, dir_fd index or -1, follow symlinks), ...)
    file_events = {
        "os.chmod": ((0, 2, True),), "os.chown": ((0, 3, True),),
        "os.link": ((0, 2, True), (0, 2, False), (1, 3, False)),
        "os.mkdir": ((0, 2, False),), "os.remove": ((0, 1, False),),
        "os.rename": ((0, 2, False), (1, 3, False)), "os.rmdir": ((0, 1, False),),
        "os.symlink": ((1, 2, False),), "os.truncate": ((0, -1, True),), "os.utime": ((0, 3, True),),
        "os.setxattr": ((0, -1, True),), "os.removexattr": ((0, -1, True),),
    }
    refused_events = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents",
                                "cpython.PyInterpreterState_New"})
    # Building code objects is how crafted bytecode gets in; types.coroutine (asyncio uses it at
    # import) only sets a flag on compiled code, so a call straight from it is let through.
    _getframe, coroutine_code = sys._getframe, types.coroutine.__code__

    def deny(what: str) -> None:
        raise _PermissionError(f"sandbox: {what} is not allowed")

    def as_text(p: object) -> str | None:
        t = _type(p)
        if t is _str:
            return p  # type: ignore[return-value]
        if t is _int:
            return None
        if _isinstance(p, _str):
            return _str_add("", p)
        if _isinstance(p, _bytes):
            return _bytes_decode(p, "utf-8", "surrogateescape")
        if _isinstance(p, bytearray):
            return _bytearray_decode(p, "utf-8", "surrogateescape")
        if t is _DirEntry:
            return as_text(p.path)  # type: ignore[attr-defined]
        if t in path_types:
            return as_text(_fspath(p))
        deny(f"a path of type {t.__name__}")
        return None

    def realpath(path: str) -> str:
        if not _startswith(path, "/"):
            path = _getcwd() + "/" + path
        pending = _list(_reversed(_split(path, "/")))
        resolved = ""
        hops = 0
        while pending:
            name = pending.pop()
            if name == "" or name == ".":
                continue
            if name == "..":
                resolved = resolved[: _rfind(resolved, "/")] if resolved else ""
                continue
            candidate = resolved + "/" + name
            try:
                st = _lstat(candidate)
            except OSError:
                resolved = candidate
                continue
            if (st.st_mode & 0o170000) == 0o120000:
                hops += 1
                if hops > 40:
                    deny("a symlink loop")
                target = _readlink(candidate)
                if _startswith(target, "/"):
                    resolved = ""
                pending.extend(_reversed(_split(target, "/")))
            else:
                resolved = candidate
        return resolved or "/"

    def inside(real: str) -> bool:
        return real == wd or _startswith(real, wd_prefix)

    def resolve(p: object, dir_fd: object, follow: bool) -> str | None:
        """Real path an operation acts on; None for fds that are not files (pipes, sockets)."""
        text = as_text(p)
        if text is None:  # an fd
            target = _readlink(f"/proc/self/fd/{p}")
            return realpath(target) if _startswith(target, "/") else None
        if not _startswith(text, "/"):
            if dir_fd is None or dir_fd == -1 or dir_fd == -100:  # not given, AT_FDCWD
                base = _getcwd()
            else:
                base = _readlink(f"/proc/self/fd/{dir_fd}")
            text = base + "/" + text
        if follow:
            return realpath(text)
        head, _, tail = _rpartition(text, "/")
        if tail in ("", ".", ".."):
            return realpath(text)
        return realpath(head or "/") + "/" + tail

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if path is None or _type(path) is _int:
                return
            writing = flags & o_write if _type(flags) is _int else True
            if not writing and mode is not None:
                return  # io.open for reading: the common case (every import)
            try:
                text = as_text(path)
                if writing and text in specials:
                    return
                real = realpath(text)  # type: ignore[arg-type]
            except OSError:
                deny("opening a path that cannot be resolved")
            if inside(real):
                return
            if writing:
                deny(f"writing outside the working directory ({real})")
            try:
                st = _stat(real)
            except OSError:
                return
            if (st.st_mode & 0o170000) == 0o040000:
                deny(f"opening a directory outside the working directory ({real})")
            return
        if event == "import":
            name = args[0]
            if _type(name) is not _str:
                name = _str_add("", name) if _isinstance(name, _str) else ""
            if name in blocked_modules:
                raise _ImportError(f"sandbox: the module {name!r} is disabled")
            return
        spec = file_events.get(event)
        if spec is not None:
            for path_i, fd_i, follow in spec:
                try:
                    real = resolve(args[path_i], args[fd_i] if fd_i >= 0 else None, follow)
                except OSError:
                    deny(f"{event} on a path that cannot be resolved")
                if real is not None and not inside(real):
                    deny(f"{event} outside the working directory ({real})")
            return
        if event in process_events:
            deny("starting or signalling processes")
        if event == "os.kill":
            if args[0] != _getpid():
                deny("signalling other processes")
            return
        if event == "resource.prlimit":
            if args[0] not in (0, _getpid()):
                deny("changing limits of other processes")
            return
        if not allow_network:
            if event == "socket.__new__":
                if args[1] not in (1, -1):  # AF_UNIX (socketpair, asyncio), or adopting an fd
                    deny("network access")
                return
            if event in socket_events:
                deny("network access")
        if event == "code.__new__":
            if _getframe(1).f_code is not coroutine_code:
                deny("building code objects")
            return
        if event in refused_events or _startswith(event, "ctypes."):
            deny(event)
        if event in ("object.__setattr__", "object.__delattr__") and args[0] in protected:
            deny("changing pathlib classes")

    import _posixsubprocess  # noqa: F401  (loaded now so that re-importing it is refused)

    def fork_exec(*args: object, **kwargs: object) -> None:
        deny("starting processes")

    _posixsubprocess.fork_exec = fork_exec  # type: ignore[attr-defined]
    sys.addaudithook(hook)


def _child_stage2() -> None:
    """The interpreter user code runs in: reads commands, runs cells, reports results."""
    import ast
    import builtins
    import json
    import linecache
    import os
    import resource
    import sys
    import traceback
    import types
    import warnings

    cfg = json.loads(sys.argv[1])
    wd, res_fd, cmd_fd, once = cfg["workdir"], cfg["res_fd"], cfg["cmd_fd"], cfg["once"]
    sys.argv = [""]
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    warnings.filterwarnings("ignore", message=".*non-interactive.*cannot be shown")

    def send(msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        while data:
            data = data[os.write(res_fd, data):]

    # What the isolation looks like from inside (for isolation_report()).
    facts = {}
    try:
        status = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                status[key] = value.strip()
        facts["no_capabilities"] = int(status.get("CapEff", "1"), 16) == 0
        facts["no_new_privileges"] = status.get("NoNewPrivs") == "1"
    except (OSError, ValueError):
        facts["no_capabilities"] = facts["no_new_privileges"] = False
    for ns in ("net", "mnt", "user"):
        try:
            facts[ns + "ns"] = os.stat(f"/proc/self/ns/{ns}").st_ino != cfg["parent_ns"].get(ns)
        except OSError:
            facts[ns + "ns"] = False
    facts["uid"] = os.getuid()
    facts["rlimits"] = (resource.getrlimit(resource.RLIMIT_AS)[1] <= cfg["memory"]
                        and resource.getrlimit(resource.RLIMIT_FSIZE)[1] <= cfg["file"]
                        and resource.getrlimit(resource.RLIMIT_CORE)[1] == 0)
    facts["nproc_zero"] = resource.getrlimit(resource.RLIMIT_NPROC)[1] == 0
    try:
        facts["root_readonly"] = bool(os.statvfs("/").f_flag & os.ST_RDONLY)
        facts["workdir_writable"] = not os.statvfs(wd).f_flag & os.ST_RDONLY
    except OSError:
        facts["root_readonly"] = facts["workdir_writable"] = False

    if cfg["guard"]:
        _child_guard(wd, cfg["network"])  # noqa: F821  (defined next to this function in the child)
    facts["audit_hook"] = bool(cfg["guard"])
    sys.path.append(wd)  # modules the code writes can be imported, without shadowing the stdlib
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = main
    ns = main.__dict__
    cap = max(int(cfg["output_bytes"]), 200)
    figure_names: set[str] = set()

    def flush() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()  # type: ignore[union-attr]
            except BaseException:
                pass

    def short_repr(obj: object) -> str:
        try:
            text = repr(obj)
        except BaseException as e:
            return f"<repr() failed: {type(e).__name__}: {e}>"
        if len(text) > cap:
            text = text[:cap] + f"... [{len(text) - cap} more characters]"
        return text

    def save_figures(cell: int) -> list[str]:
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None or not cfg["save_figures"]:
            return []
        names = []
        try:
            for k, num in enumerate(plt.get_fignums(), 1):
                name, j = f"figure-{cell}-{k}.png", 1
                while name in figure_names or os.path.lexists(os.path.join(wd, name)):
                    j += 1
                    name = f"figure-{cell}-{k}-{j}.png"
                plt.figure(num).savefig(os.path.join(wd, name), format="png")
                figure_names.add(name)
                names.append(name)
        except BaseException as e:
            print(f"[sandbox: could not save the figures: {type(e).__name__}: {e}]", file=sys.__stderr__)
        finally:
            try:
                plt.close("all")
            except BaseException:
                pass
        return names

    def hide_own_frames(report: traceback.TracebackException, seen: set) -> None:
        """Drop the frames of this bootstrap (the audit hook's, for one) from a traceback."""
        if id(report) in seen:
            return
        seen.add(id(report))
        report.stack = traceback.StackSummary.from_list([f for f in report.stack if f.filename != "<qwen-sandbox>"])
        for other in (report.__cause__, report.__context__):
            if other is not None:
                hide_own_frames(other, seen)

    def run_cell(code: str, cell: int) -> dict:
        filename = "<program>" if once else f"<cell-{cell}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        status, error, value, exit_code = "ok", None, None, 0
        try:
            if once:
                exec(compile(code, filename, "exec", dont_inherit=True), ns)
            else:
                tree = ast.parse(code, filename, "exec")
                last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
                exec(compile(tree, filename, "exec", dont_inherit=True), ns)
                if last is not None:
                    result = eval(compile(ast.Expression(last.value), filename, "eval", dont_inherit=True), ns)
                    if result is not None:
                        ns["_"] = result
                        value = short_repr(result)
        except SystemExit as e:
            if e.code is not None and e.code != 0:
                status, error = "error", f"SystemExit: {e.code}"
                exit_code = e.code if isinstance(e.code, int) else 1
                if not isinstance(e.code, int):
                    print(e.code, file=sys.__stderr__)
        except BaseException as e:
            status = "memory" if isinstance(e, MemoryError) else "error"
            exit_code = 1
            try:
                error = traceback.format_exception_only(type(e), e)[-1].strip()
                tb = e.__traceback__
                while tb is not None and tb.tb_frame.f_code.co_filename != filename:
                    tb = tb.tb_next
                report = traceback.TracebackException(type(e), e, tb)
                hide_own_frames(report, set())
                flush()
                sys.__stderr__.write("".join(report.format()))  # type: ignore[union-attr]
            except BaseException:
                error = error or type(e).__name__
            del e
        flush()
        images = save_figures(cell)
        flush()
        return {"t": "result", "cell": cell, "status": status, "error": error, "value": value,
                "images": images, "exit": exit_code}

    send({"t": "ready", "facts": facts})
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = os.read(cmd_fd, 1 << 16)
            if not chunk:
                os._exit(0)
            buf += chunk
        line, _, buf = buf.partition(b"\n")
        msg = json.loads(line)
        result = run_cell(msg["code"], msg["cell"])
        send(result)
        if once:
            os._exit(result["exit"] if isinstance(result["exit"], int) and 0 <= result["exit"] < 256 else 1)


@functools.cache
def _scripts() -> tuple[str, str]:
    """Source of stage 1 and stage 2, taken from the functions above."""
    head = "from __future__ import annotations\n"
    stage1 = head + inspect.getsource(_child_stage1) + "\n_child_stage1()\n"
    stage2 = head + inspect.getsource(_child_guard) + "\n" + inspect.getsource(_child_stage2) + "\n_child_stage2()\n"
    return stage1, stage2


@functools.cache
def _host() -> dict:
    """Facts about the parent the child needs: paths the interpreter reads, our namespaces."""
    needed = {os.path.realpath(sys.executable), os.path.dirname(os.path.abspath(sys.executable))}
    for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix):
        needed.add(os.path.realpath(p))
    try:
        import site

        needed.update(os.path.realpath(p) for p in site.getsitepackages())
    except (ImportError, AttributeError):
        pass
    ns = {}
    for name in ("net", "mnt", "user"):
        try:
            ns[name] = os.stat(f"/proc/self/ns/{name}").st_ino
        except OSError:
            pass
    return {"needed": sorted(p for p in needed if os.path.isdir(p) or os.path.isfile(p)), "ns": ns}


def _child_env(workdir: str) -> dict[str, str]:
    """The whole environment of the child: nothing of the parent's leaks in."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",  # same set/dict order on every run
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": os.path.join(workdir, ".matplotlib"),
        # One thread per BLAS: threads count against RLIMIT_NPROC, and the machine is shared.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TERM": "dumb",
    }


class _Capped:
    """One output stream: keeps the first `limit` bytes, counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - max(room, 0))

    def text(self) -> str:
        s = self.data.decode("utf-8", "replace")
        if self.dropped:
            sep = "" if not s or s.endswith("\n") else "\n"
            s += f"{sep}[sandbox: output truncated, {self.dropped} more bytes dropped]\n"
        return s


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class _Child:
    """One sandboxed interpreter and the parent's ends of its pipes."""

    def __init__(self, workdir: str, limits: SandboxLimits, *, once: bool, stdin: int | None = None,
                 save_figures: bool = True, guard: bool = True, namespaces: bool = True) -> None:
        # `guard` and `namespaces` exist for the tests: they switch layers off to check the others.
        self.limits = limits
        self.workdir = workdir
        self.once = once
        self.closed = False
        cmd_r, self.cmd_w = os.pipe2(os.O_CLOEXEC)
        self.res_r, res_w = os.pipe2(os.O_CLOEXEC)
        self.out_r, out_w = os.pipe2(os.O_CLOEXEC)
        self.err_r, err_w = os.pipe2(os.O_CLOEXEC)
        host = _host()
        cfg = {
            "python": sys.executable, "workdir": workdir, "res_fd": res_w, "cmd_fd": cmd_r, "once": once,
            "network": limits.network, "guard": guard, "namespaces": namespaces, "memory": limits.memory_mb << 20,
            "file": limits.file_mb << 20, "cpu": limits.cpu_limit_s if once else None, "nofile": NOFILE_LIMIT,
            "save_figures": save_figures, "output_bytes": limits.output_bytes, "needed": host["needed"],
            "parent_ns": host["ns"], "drop_to": [NOBODY, NOBODY],
        }
        stage1, stage2 = _scripts()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", stage1, json.dumps(cfg), stage2],
                stdin=stdin if stdin is not None else subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                pass_fds=(cmd_r, res_w), cwd=workdir, env=_child_env(workdir), start_new_session=True,
            )
        except BaseException:
            for fd in (self.cmd_w, self.res_r, self.out_r, self.err_r):
                os.close(fd)
            raise
        finally:
            for fd in (cmd_r, res_w, out_w, err_w):
                os.close(fd)
        self.pid = self.proc.pid
        for fd in (self.cmd_w, self.res_r, self.out_r, self.err_r):
            os.set_blocking(fd, False)
        self.reading = {self.res_r, self.out_r, self.err_r}
        self.res_buf = bytearray()
        self.messages: list[dict] = []
        self.pending = b""
        self.out = _Capped(limits.output_bytes)
        self.err = _Capped(limits.output_bytes)
        self.facts: dict = {}
        self.notes: list[str] = []
        self.flooded = False
        try:
            outcome = self._pump(time.monotonic() + STARTUP_TIMEOUT_S, lambda: self._take("ready") is not None)
        except BaseException:
            self.kill()
            raise
        if outcome != "stop":
            self.kill()
            raise SandboxError(f"the sandbox did not start ({outcome}, exit status {self.proc.returncode}): "
                               + self.err.text()[-2000:])
        self.out = _Capped(limits.output_bytes)
        self.err = _Capped(limits.output_bytes)

    # -- protocol -----------------------------------------------------------------------------

    def _take(self, kind: str, cell: int | None = None) -> dict | None:
        for i, msg in enumerate(self.messages):
            if msg.get("t") == kind and (cell is None or msg.get("cell") == cell):
                del self.messages[i]
                if kind == "ready":
                    self.facts.update(msg.get("facts") or {})
                return msg
        return None

    def _on_result_bytes(self, data: bytes) -> None:
        self.res_buf += data
        if len(self.res_buf) > MAX_MESSAGE_BYTES:
            self.flooded = True
            self.res_buf.clear()
            return
        while True:
            i = self.res_buf.find(b"\n")
            if i < 0:
                return
            line = bytes(self.res_buf[:i])
            del self.res_buf[: i + 1]
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # garbage on the result pipe: ignored, the exit status still counts
            if isinstance(msg, dict):
                if msg.get("t") == "stage1":
                    self.facts.update(msg.get("facts") or {})
                    self.notes.extend(msg.get("notes") or [])
                else:
                    self.messages.append(msg)

    def _pump(self, deadline: float, stop, cpu_limit: tuple[float, float] | None = None) -> str:
        """Move bytes until `stop()`, end of all pipes ("eof"), the deadline, or the CPU limit."""
        poller = select.poll()
        registered: dict[int, int] = {}
        next_cpu_check = 0.0
        while True:
            if stop():
                return "stop"
            if self.flooded:
                return "flood"
            if not self.reading:
                return "eof"
            now = time.monotonic()
            if now >= deadline:
                return "deadline"
            if cpu_limit is not None and now >= next_cpu_check:
                next_cpu_check = now + 0.2
                if self._cpu_seconds() - cpu_limit[0] > cpu_limit[1]:
                    return "cpu"
            want = {fd: select.POLLIN for fd in self.reading}
            if self.pending:
                want[self.cmd_w] = select.POLLOUT
            for fd in list(registered):
                if fd not in want:
                    poller.unregister(fd)
                    del registered[fd]
            for fd, ev in want.items():
                if registered.get(fd) != ev:
                    poller.register(fd, ev)
                    registered[fd] = ev
            events = poller.poll(max(1, int(min(deadline - now, 0.25) * 1000)))
            for fd, ev in events:
                if fd == self.cmd_w:
                    try:
                        n = os.write(fd, self.pending[: 1 << 16])
                        self.pending = self.pending[n:]
                    except BlockingIOError:
                        pass
                    except BrokenPipeError:
                        self.pending = b""
                    continue
                self._read(fd)

    def _read(self, fd: int) -> bool:
        """Read what is there; False at end of file."""
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        if not data:
            self.reading.discard(fd)
            return False
        if fd == self.res_r:
            self._on_result_bytes(data)
        elif fd == self.out_r:
            self.out.add(data)
        else:
            self.err.add(data)
        return True

    def _drain(self) -> None:
        """Take the output already in the pipes (the child flushed it before reporting)."""
        poller = select.poll()
        for fd in (self.out_r, self.err_r):
            if fd in self.reading:
                poller.register(fd, select.POLLIN)
        while True:
            ready = [fd for fd, _ in poller.poll(0) if fd in self.reading]
            if not ready:
                return
            for fd in ready:
                if not self._read(fd):
                    poller.unregister(fd)

    def _cpu_seconds(self) -> float:
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def _exited(self) -> bool:
        """Has the child exited? Does not reap it, so its pid cannot be reused before killpg."""
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def kill(self) -> None:
        """SIGKILL the whole process group, reap the child, close our pipe ends."""
        if self.closed:
            return
        self.closed = True
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for fd in (self.cmd_w, self.res_r, self.out_r, self.err_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.reading.clear()

    # -- running ------------------------------------------------------------------------------

    def run(self, code: str, cell: int) -> tuple[RunResult, bool]:
        """Run one cell. Returns the result and whether the child is still usable."""
        limits = self.limits
        self.out = _Capped(limits.output_bytes)
        self.err = _Capped(limits.output_bytes)
        self.pending += (json.dumps({"code": code, "cell": cell}) + "\n").encode()
        start = time.monotonic()
        deadline = start + limits.timeout_s
        cpu = None if self.once else (self._cpu_seconds(), float(limits.cpu_limit_s))
        result: dict | None = None
        finished = start

        def got_result() -> bool:
            nonlocal result, finished
            result = self._take("result", cell)
            finished = time.monotonic()
            return result is not None

        outcome = self._pump(deadline, got_result, cpu)
        if result is not None:
            self._drain()
            if not self.once:
                return self._make(result, finished - start, None), True
            # One-shot: the child exits right after reporting; collect the rest and its exit status.
            self._pump(min(deadline, time.monotonic() + 2.0) + 0.5, lambda: False)
            self._wait_exit(time.monotonic() + 1.0)
            self._drain()
            self.kill()
            return self._make(result, finished - start, self.proc.returncode), False
        if outcome == "eof":
            outcome = "exited" if self._wait_exit(deadline) else "deadline"
        if outcome == "exited":
            self._drain()
        seconds = time.monotonic() - start
        self.kill()
        rc = self.proc.returncode
        if outcome == "flood":
            return self._result("killed", "killed: the code flooded the sandbox's result pipe", seconds, rc), False
        if outcome == "deadline":
            return self._result("timeout", f"timed out after {limits.timeout_s:g} s", seconds, -signal.SIGKILL), False
        if outcome == "cpu":
            return self._result("timeout", f"CPU time limit of {limits.cpu_limit_s} s exceeded", seconds,
                                -signal.SIGKILL), False
        # The child ended without a result: it exited on its own or was killed by the kernel.
        if rc == 0:
            return self._result("ok", None, seconds, rc), False
        if rc > 0:
            return self._result("error", f"exited with status {rc}", seconds, rc), False
        sig = -rc
        if sig == signal.SIGXCPU:
            return self._result("timeout", f"CPU time limit of {limits.cpu_limit_s} s exceeded", seconds, rc), False
        if sig == signal.SIGXFSZ:
            return self._result("error", f"file size limit of {limits.file_mb} MB exceeded", seconds, rc), False
        tail = self.err.text()[-4000:]
        if sig == signal.SIGKILL or any(s in tail for s in ("MemoryError", "bad_alloc", "out of memory",
                                                              "Cannot allocate memory")):
            return self._result("memory", f"killed by {_signal_name(sig)} (out of memory?)", seconds, rc), False
        return self._result("killed", f"killed by {_signal_name(sig)}", seconds, rc), False

    def _wait_exit(self, deadline: float) -> bool:
        while not self._exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def _result(self, status: str, error: str | None, seconds: float, rc: int | None) -> RunResult:
        return RunResult(status=status, stdout=self.out.text(), stderr=self.err.text(), returncode=rc,
                         seconds=seconds, truncated=bool(self.out.dropped or self.err.dropped), error=error)

    def _make(self, msg: dict, seconds: float, rc: int | None) -> RunResult:
        status = msg.get("status")
        if status not in STATUSES:  # only a forged message can say that
            status = "error"
        images = []
        for name in msg.get("images") or []:
            path = Path(self.workdir) / str(name)
            if isinstance(name, str) and "/" not in name and name.endswith(".png") and path.is_file():
                images.append(path)
        error, value = msg.get("error"), msg.get("value")
        res = self._result(str(status), str(error) if error is not None else None, seconds, rc)
        res.value = str(value) if value is not None else None
        res.images = images
        return res


class _Workdir:
    """The directory a sandbox may write: a fresh temp dir (removed at the end) or the caller's."""

    def __init__(self, workdir: str | os.PathLike | None) -> None:
        if workdir is None:
            self.path = os.path.realpath(tempfile.mkdtemp(prefix="qwen-sandbox-"))
            self.owned = True
        else:
            os.makedirs(workdir, exist_ok=True)
            self.path = os.path.realpath(workdir)
            self.owned = False
        st = os.stat(self.path)
        self.owner = (st.st_uid, st.st_gid)

    def give_back(self) -> None:
        """After the child is dead: a root parent's child may have chown'd the tree to nobody."""
        if self.owned or os.geteuid() != 0:
            return
        for dirpath, dirnames, filenames in os.walk(self.path):
            for p in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                try:
                    if os.lstat(p).st_uid != self.owner[0]:
                        os.lchown(p, *self.owner)
                except OSError:
                    pass

    def remove(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)


def run_python(code: str, *, workdir: str | os.PathLike | None = None, limits: SandboxLimits = SandboxLimits(),
               stdin: str | None = None) -> RunResult:
    """Run `code` as a program (`__name__ == "__main__"`) in a fresh sandboxed interpreter.

    `workdir`: the directory the code starts in and may write; default a temp dir removed
    afterwards. Matplotlib figures are saved as PNGs only when a workdir is given (they would be
    deleted with the temp dir). `stdin`: text the program reads from standard input (default empty).
    The status is "ok" for exit status 0, "error" for an exception or a nonzero exit.
    """
    wd = _Workdir(workdir)
    stdin_file = None
    child = None
    try:
        if stdin is not None:
            stdin_file = tempfile.TemporaryFile()
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
        child = _Child(wd.path, limits, once=True, stdin=stdin_file.fileno() if stdin_file else None,
                       save_figures=workdir is not None)
        if stdin_file is not None:
            stdin_file.close()
            stdin_file = None
        result, _ = child.run(code, 1)
        return result
    finally:
        if child is not None:
            child.kill()
        if stdin_file is not None:
            stdin_file.close()
        wd.give_back()
        wd.remove()


def _shutdown(holder: dict, wd: _Workdir) -> None:
    child = holder.pop("child", None)
    if child is not None:
        child.kill()
    wd.give_back()
    wd.remove()


class PythonSession:
    """A persistent sandboxed interpreter, like a notebook kernel.

    Each `run(code)` executes in the same globals; if the code ends with an expression its repr
    comes back as `value`; figures left open are saved as PNGs in the workdir. `limits` apply to
    each run. After a timeout, a CPU-limit or memory kill, or a crash, the interpreter is restarted
    on the next run and the result's `error` says that the state was lost. Use as a context manager
    or call `close()`, which kills the child and removes a temp workdir.
    """

    def __init__(self, workdir: str | os.PathLike | None = None, limits: SandboxLimits = SandboxLimits()) -> None:
        self.limits = limits
        self._wd = _Workdir(workdir)
        self._lock = threading.Lock()
        self._holder: dict = {}
        self._cell = 0
        self._finalizer = weakref.finalize(self, _shutdown, self._holder, self._wd)
        try:
            self._start()
        except BaseException:
            self._finalizer()
            raise

    @property
    def workdir(self) -> Path:
        return Path(self._wd.path)

    @property
    def pid(self) -> int | None:
        """Pid of the live interpreter (also its process group and session id), or None."""
        child = self._holder.get("child")
        return child.pid if child is not None else None

    def _start(self) -> None:
        self._holder["child"] = _Child(self._wd.path, self.limits, once=False)

    def run(self, code: str) -> RunResult:
        """Run a cell of code in the session."""
        with self._lock:
            if not self._finalizer.alive:
                raise ValueError("run() on a closed PythonSession")
            if "child" not in self._holder:
                self._start()
            self._cell += 1
            try:
                result, alive = self._holder["child"].run(code, self._cell)
            except BaseException:  # interrupted in the parent: do not leave a half-run cell behind
                self._holder.pop("child").kill()
                raise
            if not alive:
                self._holder.pop("child").kill()
                lost = "the interpreter was restarted, so variables and imports from earlier runs are gone"
                result.error = f"{result.error}; {lost}" if result.error else lost
            return result

    def reset(self) -> None:
        """Forget all state: the next run starts a fresh interpreter (files in the workdir stay)."""
        with self._lock:
            child = self._holder.pop("child", None)
            if child is not None:
                child.kill()
            if self._finalizer.alive:
                self._start()

    def close(self) -> None:
        """Kill the interpreter; remove the workdir if it is a temp dir we made."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> PythonSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@functools.cache
def isolation_report() -> dict[str, bool]:
    """Which isolation layers are active for a sandbox on this machine (probed once per process).

    Keys: separate_process, resource_limits, process_limit (kernel RLIMIT_NPROC=0: no fork, no
    threads), network_namespace, mount_namespace, readonly_filesystem (all but the workdir),
    user_namespace, privileges_dropped (root parent, child runs as nobody), no_capabilities,
    no_new_privileges, audit_hook.
    """
    wd = _Workdir(None)
    child = None
    try:
        child = _Child(wd.path, SandboxLimits(timeout_s=5), once=False, save_figures=False)
        f = child.facts
    finally:
        if child is not None:
            child.kill()
        wd.remove()
    uid = f.get("uid", 0)
    return {
        "separate_process": True,
        "resource_limits": bool(f.get("rlimits")),
        "process_limit": bool(f.get("nproc_zero")) and uid != 0,
        "network_namespace": bool(f.get("netns")),
        "mount_namespace": bool(f.get("mntns")),
        "readonly_filesystem": all(bool(f.get(k)) for k in ("readonly", "root_readonly", "workdir_writable")),
        "user_namespace": bool(f.get("userns")),
        "privileges_dropped": bool(f.get("dropped")) and uid != 0,
        "no_capabilities": bool(f.get("no_capabilities")),
        "no_new_privileges": bool(f.get("no_new_privileges")),
        "audit_hook": bool(f.get("audit_hook")),
    }
