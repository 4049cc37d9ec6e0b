# Host reach: read /etc/shadow, list /root, and read a world-readable file outside.
import posix

open("/etc/shadow").read()
posix.listdir("/root")
open("__SECRET__").read()


def add(a, b):
    return a + b
