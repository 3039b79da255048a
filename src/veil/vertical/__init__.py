"""Vertical federated learning: PSI for id alignment, then models over column-split data."""
