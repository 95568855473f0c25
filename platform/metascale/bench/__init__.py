"""Benchmarks anyone can rerun: `metascale bench NAME` prints one JSON object as its last line."""
