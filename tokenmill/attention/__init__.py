"""Attention over the paged KV cache: one backend interface (`backend.py`), one module per implementation."""
