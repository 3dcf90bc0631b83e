"""Scoring: candidates, the one fusion rule, its calibration, and peer propagation."""
