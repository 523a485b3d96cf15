"""Distillation losses: pure math in `functional`, one small module per method."""
