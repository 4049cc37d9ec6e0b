# Harness crash: a value nested 100,000 deep.
def add(a, b):
    value = a + b
    for _ in range(100_000):
        value = [value]
    return value
