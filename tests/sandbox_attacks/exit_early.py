# Forgery: sys.exit(0) at module level after defining the right function.
def add(a, b):
    return a + b


import sys

sys.exit(0)
