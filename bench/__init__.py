"""Benchmarks of deqfusion against torchdeq and the authors' release: `python -m bench.run --help`."""
