"""Ordermill sandbox: local WHM API 1 and EPP servers for the demo and the tests.

NEVER FOR PRODUCTION. These are not cPanel nor a domain registry: they keep accounts and
domains in memory, accept one built-in login, and fail on purpose when asked to. They
exist so that `./scripts/run` shows provisioning end to end on one machine (`ordermill
sandbox`), and so that the tests exercise the real protocols (tests/fakes import them).
Every answer says what they are (WHM: the `X-Ordermill-Sandbox` header and
`metadata.reason` of successful calls; EPP: the greeting's svID), and no production setting
defaults to them (tests/test_sandbox.py checks).
"""

BANNER = "Ordermill sandbox, a local test server: never for production"
