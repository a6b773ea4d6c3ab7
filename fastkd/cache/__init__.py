"""Offline teacher-logit cache (being built)."""
