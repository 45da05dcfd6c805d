"""Benchmarks: each prints a table side by side with the reference or the peer, in one run.

Run them as modules from the repository root (``.venv/bin/python -m bench.engine``) so they import the
shared test-support package ``testsupport`` the same way the tests do.
"""
