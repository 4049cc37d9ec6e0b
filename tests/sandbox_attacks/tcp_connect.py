# Host reach: TCP to a host listener on 127.0.0.1, with the raw socket type (the guard
# only replaces the module attributes).
import socket

raw = next(c for c in socket.socket.__mro__ if c.__module__ == "_socket")
client = raw(socket.AF_INET, socket.SOCK_STREAM)
client.settimeout(1)
client.connect(("127.0.0.1", __PORT__))


def add(a, b):
    return a + b
