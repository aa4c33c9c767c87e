"""A staff alert as a Slack message: Block Kit (a section with the title, a section of
fields with the facts, the console's order page when CONSOLE_URL is set) and a plain `text`
fallback for notifications and clients without blocks.

Slack reads `&`, `<` and `>` as control characters in mrkdwn (`<!channel>`, `<url|label>`):
every text from outside (a client's name, an order ref, an error) is escaped, so a client
named `<!channel>` pings nobody and a name cannot smuggle in a link."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

MAX_FIELDS = 10  # Slack's limit per section
MAX_FIELD = 1900  # characters of a field's text (Slack's limit is 2000)
MAX_TEXT = 2900  # a section's text (Slack's limit is 3000)


def escape(text: str) -> str:
    """Slack's mrkdwn escaping: only these three, and `&` first."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def message(title: str, facts: Mapping[str, str], *, rule: str, link: str | None) -> dict[str, object]:
    """The JSON body of the incoming-webhook POST."""
    blocks: list[dict[str, object]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": _cut(f"*{escape(title)}*", MAX_TEXT)}},
    ]
    fields = [{"type": "mrkdwn", "text": _cut(f"*{escape(label)}*\n{escape(value)}", MAX_FIELD)}
              for label, value in list(facts.items())[:MAX_FIELDS]]
    if fields:
        blocks.append({"type": "section", "fields": fields})
    if link:
        blocks.append({"type": "section", "text": {
            "type": "mrkdwn", "text": f"<{escape(link)}|Open in the Ordermill console>"}})
    blocks.append({"type": "context", "elements": [
        {"type": "mrkdwn", "text": f"Ordermill staff alert · rule {escape(rule)}"}]})
    fallback = escape(title) + "".join(f"\n{escape(k)}: {escape(v)}" for k, v in facts.items())
    return {"text": _cut(fallback, MAX_TEXT), "blocks": blocks}


def body(title: str, facts: Mapping[str, str], *, rule: str, link: str | None) -> str:
    return json.dumps(message(title, facts, rule=rule, link=link), ensure_ascii=False,
                      separators=(",", ":"))


# A Slack incoming-webhook URL's path is its secret, wherever it shows up: as given, with its
# slashes JSON-escaped (`\/`) or percent-encoded (`%2F`).
_HOOK_PATH = re.compile(r"(hooks\.slack\.com)(?:/|\\/|%2[fF])[^\s\"'<>]*", re.IGNORECASE)


def redact(text: str | None) -> str | None:
    """Text that may quote a Slack URL (an answer, an error), with the URL's path removed."""
    return _HOOK_PATH.sub(r"\1/<secret>", text) if text else text
