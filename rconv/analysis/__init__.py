"""Measuring and showing outcomes: metrics and explanations, and every figure, built from tables."""
