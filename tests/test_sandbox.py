"""Hostile completions must fail their own problem and nothing else.

Each hostile completion does its damage first and then returns the right answer, so it
passes only if the sandbox let the damage through. Benign right and wrong completions are
mixed in and must score as they would alone.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest

from fpbench.eval.sandbox import Sandbox
from fpbench.eval.codegen import build_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

PROBLEM = {
    "kind": "humaneval", "task_id": "Toy/0", "entry_point": "add",
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
}
RIGHT = "    return a + b\n"
WRONG = "    return a - b\n"


def hostile(action: str) -> str:
    """A completion that runs ``action`` (module level, before the check) and is right."""
    return RIGHT + "\n" + action + "\n"


@pytest.fixture
def targets(tmp_path):
    """Files outside the sandbox: a world-readable secret and a directory to delete."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_text("keep me")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    yield {"secret": secret, "victim": victim_dir, "listener": listener,
           "port": listener.getsockname()[1]}
    listener.close()


def test_hostile_completions_fail_alone(targets):
    secret, victim, port = targets["secret"], targets["victim"], targets["port"]
    cases = {
        "right": (RIGHT, True),
        "delete_shutil": (hostile(f"import shutil\nshutil.rmtree({str(victim)!r})"), False),
        "delete_posix": (hostile(f"import posix\nposix.unlink({str(victim / 'keep.txt')!r})"), False),
        "fork_bomb": (hostile("import posix\nwhile True:\n    posix.fork()"), False),
        "fork_os": (hostile("import os\nos.fork()"), False),
        "wrong": (WRONG, False),
        "infinite_loop": (hostile("while True:\n    pass"), False),
        "allocate_10gb": (hostile("hoard = bytearray(10 * 2**30)"), False),
        "socket": (hostile(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"), False),
        "read_outside": (hostile(f"print(open({str(secret)!r}).read())"), False),
        "kill_parent": (hostile("import posix, signal\nposix.kill(posix.getppid(), signal.SIGKILL)"), False),
        "kill_parent_os": (hostile("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)"), False),
        "exit_early": (hostile("import sys\nsys.exit(0)"), False),
        "right_again": (RIGHT, True),
    }
    box = Sandbox(timeout_s=3, memory_mb=1024, workers=2)
    programs = [build_program(PROBLEM, completion) for completion, _ in cases.values()]
    results = box.run_many(programs, progress=False)
    verdicts = {name: result for name, result in zip(cases, results)}
    for name, (_, should_pass) in cases.items():
        assert verdicts[name].passed is should_pass, (name, verdicts[name])
    assert verdicts["infinite_loop"].status == "timed out"
    assert verdicts["infinite_loop"].seconds < 10
    assert "MemoryError" in verdicts["allocate_10gb"].detail
    # The host is intact: files outside are still there, nobody connected, we are alive.
    assert (victim / "keep.txt").read_text() == "keep me"
    assert secret.read_text() == "TOP SECRET"
    with pytest.raises(socket.timeout):
        targets["listener"].accept()


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


def test_stdlib_and_numpy_are_importable():
    box = Sandbox(timeout_s=10, workers=1)
    result = box.run("import math, re, heapq, collections, itertools, hashlib, numpy\n"
                     "assert numpy.arange(4).sum() == 6 and math.isqrt(17) == 4\n")
    assert result.passed, result
