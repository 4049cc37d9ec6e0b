# requires: private-root
# Disk: 30 files of 16 MiB (480 MiB) in the working directory.
block = b"\0" * (1 << 20)
for index in range(30):
    with open(f"fill{index}.bin", "wb") as fh:
        for _ in range(16):
            fh.write(block)


def add(a, b):
    return a + b
