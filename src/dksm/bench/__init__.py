"""Benchmarks: each measures one claim of the project on real VMs and reports it."""
