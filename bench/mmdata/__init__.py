"""Synthetic picture / sound question-answer data for training and judging a small model that sees and hears."""
