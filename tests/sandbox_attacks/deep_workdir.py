# Harness crash: a working directory 3,000 levels deep (recursive cleanup fails, the tree
# stays behind); the answer is right, so only a failure of the harness would show.
import posix

fd = posix.open(".", posix.O_RDONLY)
for _ in range(3000):
    posix.mkdir("d", dir_fd=fd)
    fd = posix.open("d", posix.O_RDONLY, dir_fd=fd)
raise RuntimeError("deep tree written")
