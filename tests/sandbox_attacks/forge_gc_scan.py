# Forgery: scan every object with gc for a nonce, a pipe or a report object, and write
# success lines through each; then answer wrong.
import gc
import posix

for obj in gc.get_objects():
    fd = getattr(obj, "fd", None) if not isinstance(obj, type) else None
    if isinstance(fd, int):
        try:
            posix.write(fd, b'{"passed": true}\n')
        except Exception:
            pass
    if isinstance(obj, dict) and "nonce" in obj:
        obj["passed"] = True


def add(a, b):
    return a - b
