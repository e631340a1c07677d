"""Suite-wide settings.

Every test process (this one and the subprocesses the tests start: fresh-process loading, the two-process
accelerate run, kill -9 resumes) uses one OpenMP thread unless OMP_NUM_THREADS is already set. On a 2-core
machine, two processes with two threads each oversubscribe the cores, which made small convolutions 10-50x
slower in our measurements; one thread also keeps timings of the in-process runs steady.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
