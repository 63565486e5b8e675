"""`python -m sglang.bench_serving` for hosts without Hugging Face `datasets` (the offline GPU host).

SGLang 0.5.17's bench_serving imports `datasets.load_dataset` at import time for its MMMU loader alone; the random
datasets we drive it with never call it. Where `datasets` is missing, a module whose load_dataset refuses with a
clear message stands in, and bench_serving's own CLI runs unchanged with the same arguments.
"""

import sys
import types

try:
    import datasets  # noqa: F401
except ImportError:
    missing = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise RuntimeError("Hugging Face `datasets` is not installed on this host; use a random dataset")

    missing.load_dataset = load_dataset
    sys.modules["datasets"] = missing

from sglang.benchmark.serving import cli_main  # noqa: E402

if __name__ == "__main__":
    cli_main()
