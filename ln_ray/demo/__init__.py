"""Embedded demo dataset: multi-teacher reasoning traces for a few dozen small problems."""
