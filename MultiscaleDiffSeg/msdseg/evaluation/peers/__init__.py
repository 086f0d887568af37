"""Runners for peer segmenters (SAMSEG, ...) whose outputs the benchmarks compare with ours."""
