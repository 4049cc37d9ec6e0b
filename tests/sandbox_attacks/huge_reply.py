# Harness crash: a reply far larger than any call's value may be.
def add(a, b):
    return "x" * (8 << 20)
