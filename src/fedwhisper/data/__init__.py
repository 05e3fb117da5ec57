"""Datasets: sources yield raw items, prepare filters and partitions them, prepared reads the result."""
