"""Datasets: trace and trajectory formats, bundled sample traces and sample tasks."""
