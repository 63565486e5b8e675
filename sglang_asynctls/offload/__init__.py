"""Offload engine (--asynctls-offload): resident block sets per request on the GPU, the rest in pinned host memory.

See docs/offload.md for the data path and what is built. Kernels: `kernels/resident_update.py`,
`kernels/gather_blocks.py`; their torch twins: `offload/reference.py`.
"""
