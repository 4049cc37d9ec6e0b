# Forgery: reach the sandbox process's own globals through sys.modules['__main__'] and
# write a success verdict to every pipe or file object found there; then answer wrong.
import sys

main = sys.modules["__main__"]
for value in list(vars(main).values()):
    for fd in (getattr(value, "fd", None), getattr(value, "fileno", lambda: None)()):
        if isinstance(fd, int):
            try:
                import posix
                posix.write(fd, b'{"passed": true}\n')
            except Exception:
                pass


def add(a, b):
    return a - b
