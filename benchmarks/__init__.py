"""keyguard's side-by-side performance harness: ``python -m benchmarks [--quick]``.

A benchmark, not a test: nothing here asserts on a timing. See ``docs/benchmarks.md``
for the method and the figures.
"""
