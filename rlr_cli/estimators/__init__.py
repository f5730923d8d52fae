"""Gradient estimators; each returns an EstimatorOutput whose loss gradient is its estimate."""
