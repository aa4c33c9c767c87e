"""Outbound webhooks for integrators: signed per the Standard Webhooks specification."""
