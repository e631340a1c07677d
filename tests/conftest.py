"""Suite-wide settings.

Subprocesses started by the tests (fresh-process loading, the two-process accelerate run, kill -9 resumes) get
one OpenMP thread each: on a 2-core machine two processes with two threads each oversubscribe the cores, which
made small convolutions 10-50x slower in our measurements. The main test process keeps torch's default.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
