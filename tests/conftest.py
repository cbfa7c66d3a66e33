import os

# Tests run on a 2-core machine; keep thread pools small and deterministic.
os.environ.setdefault("RAYON_NUM_THREADS", "2")
