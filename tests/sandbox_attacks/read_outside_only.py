# Host reach: read a world-readable file outside the sandbox.
print(open("__SECRET__").read())


def add(a, b):
    return a + b
