"""Staff alerts: rules (TOML) that tell the provider's staff what needs them, by email,
Slack or a webhook endpoint."""
