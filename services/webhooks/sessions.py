"""HTTP sessions that connect only to vetted addresses, one per scheme: what the webhook
sender and the alerts' Slack sender both post through. Each session's resolver refuses
loopback, private, link-local and metadata addresses unless WEBHOOK_ALLOW_NETWORKS allows
them (addresses.py), and plain http only to allowed networks; no proxy from the
environment, no cookies kept."""

from __future__ import annotations

import aiohttp

from services.webhooks.addresses import Lookup, Policy, VettingResolver, system_lookup


class VettedSessions:
    def __init__(self, policy: Policy, *, user_agent: str, limit: int,
                 limit_per_host: int = 0, lookup: Lookup = system_lookup,
                 auto_decompress: bool = True) -> None:
        self.policy, self.lookup = policy, lookup
        self.user_agent, self.limit, self.limit_per_host = user_agent, limit, limit_per_host
        self.auto_decompress = auto_decompress
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def get(self, scheme: str) -> aiohttp.ClientSession:
        """One per scheme, each with its own vetting."""
        session = self._sessions.get(scheme)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                resolver=VettingResolver(self.policy, scheme, self.lookup), use_dns_cache=False,
                limit=self.limit, limit_per_host=self.limit_per_host)
            session = aiohttp.ClientSession(
                connector=connector, auto_decompress=self.auto_decompress, trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(), headers={"User-Agent": self.user_agent})
            self._sessions[scheme] = session
        return session

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()
