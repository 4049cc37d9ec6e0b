# Forgery: write every success line the harness might accept to fds 0..1023, including a
# pre-written "ready" and call replies; then answer wrong.
import posix

LINES = (b'{"passed": true}\n{"passed": true, "self_reported": true}\n'
         b'{"active": [], "notes": []}\n{"ready": []}\n{"value": 5}\n')
for fd in range(1024):
    try:
        posix.write(fd, LINES)
    except OSError:
        pass


def add(a, b):
    return a - b
