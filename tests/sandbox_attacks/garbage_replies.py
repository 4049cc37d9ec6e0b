# Harness crash: wrong-shaped and unparseable lines on every fd (a verdict that is JSON
# of the wrong shape, 100,000 '[' in a row); the answer is right if the garbage is ignored.
import posix

for payload in (b'{"active": 5}\n', b'{"active": [[1]]}\n', b'{"failed": [1]}\n', b"[" * 100_000 + b"\n",
                b'{"value": {"tuple": 5}}\n', b'{"raised": [1, 2]}\n', b"\xff\xfe\n"):
    for fd in range(1024):
        try:
            posix.write(fd, payload)
        except OSError:
            pass


def add(a, b):
    return a + b
