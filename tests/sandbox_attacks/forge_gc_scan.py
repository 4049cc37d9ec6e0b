# Forgery: scan every object with gc for a nonce, a pipe or a report object (anything
# with an integer fd), and write success lines through each; then answer wrong.
import gc
import posix

for obj in gc.get_objects():
    try:
        fd = vars(obj).get("fd")
    except TypeError:
        continue
    if isinstance(fd, int) and 0 <= fd < 1024:
        try:
            posix.write(fd, b'{"passed": true}\n')
        except OSError:
            pass
    if "nonce" in vars(obj):
        obj.passed = True


def add(a, b):
    return a - b
