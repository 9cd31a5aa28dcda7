"""Benchmarks: the engine replayed against the peers a user would run instead."""
