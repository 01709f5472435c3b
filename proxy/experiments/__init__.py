"""Experiments: exposures, conversions, results."""
