# Damage: SIGKILL every process this uid may signal (without a uid of its own, the
# harness and its other workers). kill(-1) reports success even when every target refused,
# so the answer is wrong on purpose: what counts is that the harness and the neighbours'
# verdicts survive.
import posix
import signal

posix.kill(-1, signal.SIGKILL)


def add(a, b):
    return a - b
