"""The KV host tier (--asynctls-host-kv-gib): KV slots in pinned host memory inside the pool's address range, an HBM
cache of the host rows decode selected, the prefill gather of host-held prefixes and the read telemetry.
See docs/offload.md.
"""
