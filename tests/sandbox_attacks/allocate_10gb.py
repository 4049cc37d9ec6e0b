# Resources: allocate 10 GB.
hoard = bytearray(10 * 2**30)


def add(a, b):
    return a + b
