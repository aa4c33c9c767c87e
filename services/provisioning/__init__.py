"""Payments, module create/terminate and domain registration (issue #3)."""
