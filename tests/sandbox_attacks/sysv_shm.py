# requires: ipcns
# Host reach: pin 4 x 64 MiB SysV shared memory segments past the program's exit, with
# the ctypes module found in memory (its import is blocked).
import gc

ctypes = next(o for o in gc.get_objects() if type(o).__name__ == "module" and o.__name__ == "ctypes")
libc = ctypes.CDLL(None, use_errno=True)
for _ in range(4):
    if libc.shmget(0, ctypes.c_size_t(64 << 20), 0o1600) < 0:
        raise OSError(ctypes.get_errno(), "shmget")


def add(a, b):
    return a + b
