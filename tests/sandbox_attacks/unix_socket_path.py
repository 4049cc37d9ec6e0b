# requires: private-root
# Host reach: connect to a host service's Unix socket by path, with the raw socket type
# (the guard only replaces the module attributes).
import socket

real = next(c for c in socket.socket.__mro__ if c.__module__ == "_socket")  # the raw type
client = real(socket.AF_UNIX, socket.SOCK_STREAM)
client.connect("__UNIX_SOCKET__")
client.sendall(b"reached")


def add(a, b):
    return a + b
