# Resources: never return.
while True:
    pass
