# Damage: one fork through os.
import os

os.fork()


def add(a, b):
    return a + b
