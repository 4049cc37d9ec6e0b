# Host reach: TCP to a host listener on 127.0.0.1 (guard first, then the real class).
import socket

try:
    socket.create_connection(("127.0.0.1", __PORT__), timeout=1)
except PermissionError:
    real = socket.socket.__mro__[1]
    client = real(socket.AF_INET, socket.SOCK_STREAM)
    client.settimeout(1)
    client.connect(("127.0.0.1", __PORT__))


def add(a, b):
    return a + b
