"""Shared by every backend: the executor, records, buffers, waits and the contract."""
