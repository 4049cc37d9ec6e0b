# requires: private-root
# Host reach: connect to a host service's Unix socket by path, with the real socket class
# (the guard's subclass keeps it as its base).
import socket

real = socket.socket.__mro__[1]
client = real(socket.AF_UNIX, socket.SOCK_STREAM)
client.connect("__UNIX_SOCKET__")
client.sendall(b"reached")


def add(a, b):
    return a + b
