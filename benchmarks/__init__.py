"""Benchmarks of fedsim against the naive references they replace; run as `python -m benchmarks.NAME`.

Each prints a readable table and, as its last line, one JSON object with the headline figures.
`--quick` runs a smaller version (seconds). Results and their interpretation: docs/PERFORMANCE.md.
"""
