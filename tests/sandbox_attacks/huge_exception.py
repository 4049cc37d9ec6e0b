# Unbounded storage: a 64 MiB exception message.
raise ValueError("x" * (64 << 20))
