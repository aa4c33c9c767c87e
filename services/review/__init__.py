"""Operator review commands (issue #4)."""
