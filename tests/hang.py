"""Worker functions for pool tests (imported by worker subprocesses as tests.hang)."""
import os
import time


def work(x, options):
    if x == "hang":
        while True:  # a page that never finishes
            time.sleep(0.01)
    if x == "crash":
        os._exit(3)  # a segfault-like death
    if x == "raise":
        raise ValueError("bad page")
    return x.upper()
