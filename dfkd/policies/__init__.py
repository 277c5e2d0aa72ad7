"""Policies: schedules, sample weighting and temperature. Each is a small object chosen by name in a recipe."""
