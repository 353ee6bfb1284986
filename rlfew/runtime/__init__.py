"""Training runtime: the `rlfew train` driver and its actors (Ray by default, in-process for tests)."""
