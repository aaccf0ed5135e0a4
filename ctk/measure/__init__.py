"""Measure: replay recorded programs against a live server, compare policies, report."""
