# Damage: delete a host file through posix, past the os-level guard.
import posix

posix.unlink("__VICTIM__/keep.txt")


def add(a, b):
    return a + b
