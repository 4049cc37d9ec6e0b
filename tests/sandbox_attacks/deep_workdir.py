# Harness crash: a working directory 3,000 levels deep (a recursive cleanup fails and
# leaves the tree behind); the answer is wrong, so only the harness is on trial.
import posix

fd = posix.open(".", posix.O_RDONLY)
for _ in range(3000):
    posix.mkdir("d", dir_fd=fd)
    fd, parent = posix.open("d", posix.O_RDONLY, dir_fd=fd), fd
    posix.close(parent)


def add(a, b):
    return a - b
