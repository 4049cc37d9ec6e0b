"""Hostile completions must fail their own problem and nothing else.

The corpus is data: each ``tests/sandbox_attacks/*.py`` is a completion of the toy
problem below, with a header comment saying what it tries (and ``# requires: LAYER`` when
only that layer stops it). Each one does its damage first and then answers right, or
tries to forge a pass and answers wrong; either way it passes only if the sandbox let it
through. They run in one batch between right and wrong answers, which must score as
they would alone, while the host must stay intact.
"""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fpbench.errors import FpbenchError
from fpbench.eval.codegen import build_program
from fpbench.eval.sandbox import (MAX_REPORT_BYTES, UID_BASE, UIDS_PER_PARENT, Program, Sandbox, parse_report,
                                  remove_tree)
from fpbench.eval import sandbox
from fpbench.eval.sandbox_child import MAX_DETAIL_CHARS, decode, encode, unreadable_prefix

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

ATTACKS = sorted((Path(__file__).parent / "sandbox_attacks").glob("*.py"))
PROBLEM = {
    "kind": "humaneval", "task_id": "Toy/0", "entry_point": "add",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
}
RIGHT = "    return a + b\n"
WRONG = "    return a - b\n"


@pytest.fixture(scope="module")
def layers():
    box = Sandbox(timeout_s=10, workers=1)
    assert box.run(build_program(PROBLEM, RIGHT)).passed
    return box.active_layers


def _has(layers: set[str], requirement: str) -> bool:
    if requirement.startswith("landlock-abi"):
        wanted = int(requirement[len("landlock-abi"):])
        return any(layer.startswith("landlock-abi") and int(layer[len("landlock-abi"):]) >= wanted
                   for layer in layers)
    return any(layer.startswith(requirement) for layer in layers)


def _host_shm_segments() -> int:
    with open("/proc/sysvipc/shm") as fh:
        return len(fh.readlines()) - 1


def _sandbox_uid_processes() -> list[int]:
    """Live processes under this test process's candidate uids (other fpbench runs on the
    machine use blocks of their own). A candidate killed on timeout together with its
    judge is reaped by init; until then it is a zombie, dead and harmless."""
    first = UID_BASE + (os.getpid() % 10_000) * UIDS_PER_PARENT
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if first <= uid < first + UIDS_PER_PARENT:
            pids.append(int(pid))
    return pids


@pytest.fixture
def host():
    """Things outside the sandbox, in a world-readable place so only the sandbox (not file
    permissions) keeps the candidate away: a secret, a directory to delete, a TCP
    listener, and Unix sockets by path and in the abstract namespace."""
    base = Path(tempfile.mkdtemp(prefix="fpbench-host-"))
    os.chmod(base, 0o755)
    secret = base / "secret.txt"
    secret.write_text("TOP SECRET")
    os.chmod(secret, 0o644)
    victim = base / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep me")
    listeners = {}
    listeners["tcp"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listeners["tcp"].bind(("127.0.0.1", 0))
    listeners["unix"] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listeners["unix"].bind(str(base / "host.sock"))
    os.chmod(base / "host.sock", 0o777)
    abstract = f"fpbench-host-{os.getpid()}"
    listeners["abstract"] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listeners["abstract"].bind("\0" + abstract)
    for listener in listeners.values():
        listener.listen(4)
        listener.settimeout(0.2)
    tokens = {"__SECRET__": str(secret), "__VICTIM__": str(victim), "__PORT__": str(listeners["tcp"].getsockname()[1]),
              "__UNIX_SOCKET__": str(base / "host.sock"), "__ABSTRACT__": abstract}
    yield {"secret": secret, "victim": victim, "listeners": listeners, "tokens": tokens}
    for listener in listeners.values():
        listener.close()
    remove_tree(str(base))


def _attack(path: Path, tokens: dict[str, str]) -> tuple[str, list[str]]:
    text = path.read_text()
    assert text.startswith("# "), f"{path.name}: start with a comment saying what it tries"
    for token, value in tokens.items():
        text = text.replace(token, value)
    requires = re.findall(r"^# requires: (\S+)", text, re.M)
    return "\n" + text, requires


def test_hostile_completions_fail_alone_and_the_host_is_intact(host, layers):
    skipped, cases = [], {"right": (RIGHT, True), "wrong": (WRONG, False)}
    for path in ATTACKS:
        completion, requires = _attack(path, host["tokens"])
        missing = [r for r in requires if not _has(layers, r)]
        if missing:
            skipped.append(f"{path.stem} (needs {', '.join(missing)})")
            continue
        cases[path.stem] = (completion, False)
    cases["right_again"] = (RIGHT, True)
    names = list(cases)
    # Right answers between the attacks: a neighbour's damage must not touch them.
    programs, expected = [], []
    for index, name in enumerate(names):
        programs.append(build_program(PROBLEM, cases[name][0]))
        expected.append((name, cases[name][1]))
        if index % 6 == 5:
            programs.append(build_program(PROBLEM, RIGHT))
            expected.append((f"right after {name}", True))
    shm_before, rss_before = _host_shm_segments(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sandboxes_before = set(Path(tempfile.gettempdir()).glob("fpbench-sandbox-*"))

    box = Sandbox(timeout_s=3, memory_mb=1024, workers=2)
    results = box.run_many(programs, progress=False)

    wrong = [(name, result) for (name, should_pass), result in zip(expected, results) if result.passed is not should_pass]
    assert not wrong, wrong
    verdicts = dict(zip((name for name, _ in expected), results))
    assert verdicts["infinite_loop"].status == "timed out" and verdicts["infinite_loop"].seconds < 10
    assert "MemoryError" in verdicts["allocate_10gb"].detail
    assert all(len(result.detail) <= MAX_DETAIL_CHARS for result in results)
    assert verdicts["forge_always_equal"].detail.startswith("TypeError: a value of type Anything")
    # The host is intact: files, no connection on any listener, no pinned segments, no
    # process or directory left behind, and the harness did not swallow a flood.
    assert (host["victim"] / "keep.txt").read_text() == "keep me"
    assert host["secret"].read_text() == "TOP SECRET"
    for kind, listener in host["listeners"].items():
        with pytest.raises(socket.timeout):
            listener.accept()
            pytest.fail(f"the sandbox reached the host's {kind} listener")
    assert _host_shm_segments() == shm_before
    assert _sandbox_uid_processes() == []
    assert set(Path(tempfile.gettempdir()).glob("fpbench-sandbox-*")) <= sandboxes_before
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 256 * 1024  # KiB
    if skipped:
        pytest.skip("layer missing on this kernel/user, not run: " + "; ".join(skipped))


def test_root_layers_are_active_where_the_kernel_has_them(layers):
    if os.geteuid() != 0:
        pytest.skip("namespaces and the uid switch need root")
    for layer in ("netns", "ipcns", "mountns", "private-root", "uid-drop", "nproc"):
        assert _has(layers, layer), (layer, layers)


def test_the_candidate_keeps_no_capability(layers):
    # Read through the kernel's own answer: capget on ourselves, via the ctypes module
    # found in memory (the import is blocked), must report empty sets.
    solution = ("import gc\n"
                "ctypes = next(o for o in gc.get_objects() if type(o).__name__ == 'module' and o.__name__ == 'ctypes')\n"
                "libc = ctypes.CDLL(None)\n"
                "head = (ctypes.c_uint32 * 2)(0x20080522, 0)\n"
                "data = (ctypes.c_uint32 * 6)()\n"
                "assert libc.capget(head, data) == 0\n"
                "CAPS = list(data)\n"
                "def caps():\n    return CAPS\n")
    result = Sandbox(timeout_s=5, workers=1).run(Program("", solution, "assert caps() == [0] * 6\n"))
    assert result.passed, result


def test_the_judge_never_uses_the_candidates_builtins():
    # The candidate shadows abs(); the test's abs must stay the real one.
    solution = "def abs(x):\n    return 0\n\ndef half(x):\n    return 7.0\n"
    result = Sandbox(timeout_s=5, workers=1).run(Program("", solution, "assert abs(half(3.0) - 1.5) < 1e-9\n", "half"))
    assert not result.passed and "AssertionError" in result.detail


@pytest.mark.parametrize("module", ["asyncio", "ssl", "http.client", "urllib.request", "xmlrpc.client"])
def test_network_modules_import_but_sockets_fail(module):
    solution = (f"import {module}\n"
                "def connect():\n"
                "    import socket\n"
                "    try:\n"
                "        socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
                "    except PermissionError:\n"
                "        return 'blocked'\n"
                "    return 'open'\n")
    result = Sandbox(timeout_s=10, workers=1).run(Program("", solution, "assert connect() == 'blocked'\n"))
    assert result.passed, result


def test_values_cross_as_plain_data():
    values = [None, True, 3, -2**70, 1.5, float("inf"), complex(1, -2), "s", b"\x00\xff", [1, (2, 3)],
              {"a": {1, 2}}, {(1, 2): frozenset({3})}]
    for value in values:
        assert decode(json.loads(json.dumps(encode(value)))) == value
    assert list(decode(encode(iter([1, 2])))) == [1, 2]
    nan = decode(encode(float("nan")))
    assert nan != nan


def test_programs_run_in_a_fresh_private_directory():
    box = Sandbox(timeout_s=5, workers=1)
    program = ("import os\n"
               "assert os.listdir('.') == [], os.listdir('.')\n"
               "open('scratch.txt', 'w').write('x')\n"
               "assert open('scratch.txt').read() == 'x'\n"
               "assert 'HF_TOKEN' not in os.environ and 'FPBENCH_SECRET' not in os.environ\n")
    os.environ["FPBENCH_SECRET"] = "do-not-leak"
    try:
        first, second = box.run_many([program, program], progress=False)
    finally:
        del os.environ["FPBENCH_SECRET"]
    assert first.passed and second.passed, (first, second)


def test_stdlib_and_numpy_are_importable_and_numpy_values_cross():
    solution = ("import math, re, heapq, collections, itertools, hashlib, tempfile, numpy\n"
                "def total(n):\n"
                "    with tempfile.TemporaryFile() as fh:\n"
                "        fh.write(b'x')\n"
                "    return numpy.arange(n).sum(), math.isqrt(17)\n")
    result = Sandbox(timeout_s=10, workers=1).run(Program("", solution, "assert total(4) == (6, 4)\n", "total"))
    assert result.passed, result


@pytest.mark.parametrize("line", [b'{"active": 5}', b'{"active": [[1]]}', b"[" * 100_000, b'{"passed": 1}',
                                  b'{"failed": [1]}', b'{"passed": true, "extra": 1}', b"\xff", b"7"])
def test_a_verdict_of_the_wrong_shape_is_a_failure(line):
    _, _, verdict, setup_error = parse_report(b'{"passed": true}\n' + line + b"\n")
    assert setup_error is None and verdict == {"failed": "malformed verdict"}


def test_without_a_private_root_an_unreadable_interpreter_is_one_clear_error(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("the private root and the uid switch are root-only")
    # A readable path that cannot be bind-mounted makes the private root fail.
    paths = sandbox.readable_paths() + ("/nonexistent-fpbench-path",)
    monkeypatch.setattr(sandbox, "readable_paths", lambda: paths)
    box = Sandbox(timeout_s=10, workers=1)
    if unreadable_prefix(list(paths)) is None:  # a world-readable installation: runs without it
        assert box.run(build_program(PROBLEM, RIGHT)).passed
        assert not any(layer.startswith("private-root") for layer in box.active_layers)
    else:
        with pytest.raises(FpbenchError, match="cannot start: .* not readable by an unprivileged uid.*world-readable"):
            box.run(build_program(PROBLEM, RIGHT))


def test_the_harness_reads_a_bounded_amount():
    box = Sandbox(timeout_s=10, workers=1)
    flood = subprocess.Popen([sys.executable, "-c", "import os\nfor _ in range(256): os.write(1, b'[' * 2**20)"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, timed_out = box._talk(flood, b"")
    flood.wait()
    flood.stdout.close()
    assert not timed_out and len(out) == MAX_REPORT_BYTES and flood.returncode == 0


def test_remove_tree_is_iterative_and_follows_no_symlink(tmp_path):
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        tmp_path = Path(tempfile.mkdtemp(dir="/dev/shm"))  # tmpfs: ext4 takes ~4 ms per rmdir
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    tree = tmp_path / "tree"
    tree.mkdir()
    fd = os.open(tree, os.O_RDONLY)
    for _ in range(1500):  # deeper than the recursion limit, a path longer than PATH_MAX
        os.mkdir("dd", dir_fd=fd)
        os.symlink(outside, "link", dir_fd=fd)
        fd, parent = os.open("dd", os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    os.close(fd)
    remove_tree(str(tree))
    assert not tree.exists() and (outside / "keep.txt").read_text() == "keep"
    remove_tree(str(tmp_path))
