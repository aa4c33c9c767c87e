"""Each component's part of the settings: small, typed, frozen models built from `Settings`.

`Settings` (shared/settings.py) stays the one flat reader of the environment: its variable
names are the operators' contract. A component is handed only its part (`settings.maxmind`,
`settings.jobs`, ...), so what it may read is written in its signature, a test builds it from
a few fields, and a secret reaches only the component that uses it. A part has no defaults of
its own: `Settings` holds them, once.

Secrets stay `SecretStr` (their repr is masked); a URL that may carry a password (AMQP_URL,
filled from AMQP_PASSWORD_FILE) is left out of a part's repr. EPP_PASSWORD and the servers'
tokens are no part at all: they are read from the environment where they are used.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr


def amqp_urls(amqp_url: str) -> list[str]:
    """The URLs of AMQP_URL: one, or several comma-separated (a cluster's nodes, tried in
    order; shared/broker.py). A comma cannot be part of an AMQP URL unescaped."""
    return [url.strip() for url in amqp_url.split(",") if url.strip()]


def amqp_user(amqp_url: str) -> str | None:
    """The RabbitMQ user of a URL, or of a list's first (settings check they all name the same
    one): `ops%40example.com` is the user ops@example.com."""
    first = (amqp_urls(amqp_url) or [""])[0]
    return unquote(urlsplit(first).username or "") or None


def hide_password(url: str) -> str:
    """A URL (or a comma-separated list of them) with each password written `***`: for a
    message or a log line."""
    shown = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        if parts.password:
            one = urlunsplit(parts._replace(
                netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))
        shown.append(one.strip())
    return ",".join(shown)


class Part(BaseModel):
    """A frozen part: nothing but its own fields (extra ones are an error, not ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# The broker and who may publish.

class BrokerSettings(Part):
    """How to reach RabbitMQ, for a component with a connection of its own."""

    # One URL or several, comma-separated (a cluster's nodes); may carry the password.
    amqp_url: str = Field(repr=False)
    namespace: str
    startup_attempts: int


class PublisherSettings(Part):
    """Who may publish what (shared/parties.py): RabbitMQ users by party."""

    storefront_users: frozenset[str]
    payment_publishers: frozenset[str]
    operator_users: frozenset[str]
    console_users: frozenset[str]
    service_users: frozenset[str]
    trust_any_publisher: bool
    own_user: str | None  # the user of AMQP_URL: a worker always trusts its own user


# The runtime's pieces (the Runtime itself takes the whole Settings and hands these out).

class PipelineSettings(Part):
    transient_attempts: int
    max_message_bytes: int


class RelaySettings(Part):
    """The outbox relay (shared/outbox.py)."""

    batch: int
    sweep_seconds: float
    linger_seconds: float
    concurrency: int
    # While a pass waits for its confirms, the next waits for it to end, up to this long
    # (WORKER_LINGER_MS, as the consumers' group commit; 0: only `linger_seconds`).
    busy_linger_seconds: float = 0.0


class MetricsSettings(Part):
    """The /metrics endpoint (shared/metrics_server.py): none when `port` is None."""

    port: int | None
    host: str
    cache_seconds: float


class SupervisorSettings(Part):
    """`ordermill run` with worker processes (shared/runtime/supervisor.py): its heartbeat
    file (None: none) and /metrics, which stand for all its processes."""

    heartbeat_file: str | None
    heartbeat_seconds: float
    metrics: MetricsSettings


class HousekeepingSettings(Part):
    outbox_retention_hours: float
    inbox_retention_days: float
    job_retention_days: float
    email_retention_days: float
    alert_retention_days: float
    webhook_retention_days: float
    every_seconds: float
    batch: int  # rows per delete, one short transaction each
    pause_seconds: float  # between batches


# Fraud.

class BannedSettings(Part):
    """FRAUD_BANNED_EMAIL_DOMAINS and FRAUD_BANNED_IPS, checked before any provider."""

    email_domains: tuple[str, ...]
    ips: tuple[str, ...]


class FraudSettings(Part):
    """The Screener's: the threshold and what it does around the provider it is given."""

    provider: Literal["rules", "maxmind", "fraudlabspro"]
    threshold: Decimal
    review_threshold: Decimal | None  # the review band's floor; None: no band
    skip_existing_clients: bool
    on_error: Literal["hold", "fraud", "pass"]
    velocity_window_minutes: int
    operator_users: frozenset[str]  # an operator's order may skip screening for its client
    banned: BannedSettings


class ScreeningSweepSettings(Part):
    """The sweeper of orders left `queued` (services/fraud/sweeper.py)."""

    stuck_seconds: int
    max_redrives: int


class RulesSettings(Part):
    """The built-in rules scorer."""

    velocity_max_orders: int
    large_first_order: Mapping[str, Decimal]  # by currency; "" is the catalog's default one
    banned: BannedSettings


class MaxMindSettings(Part):
    """MaxMind minFraud (FRAUD_PROVIDER=maxmind)."""

    account_id: int | None
    license_key: SecretStr | None
    service: Literal["score", "insights", "factors"]
    host: str
    timeout: float
    attempts: int
    hash_email: bool
    reject_free_email: bool
    reject_country_mismatch: bool
    reject_anonymous_proxy: bool
    high_risk_countries: frozenset[str]


class FraudLabsProSettings(Part):
    """FraudLabs Pro (FRAUD_PROVIDER=fraudlabspro)."""

    api_key: SecretStr | None
    host: str
    timeout: float
    attempts: int


# Leased work: provisioning jobs and mail.

class QueueSettings(Part):
    """A leased queue's policy (shared/leased_queue.py): JOB_* for jobs and mail alike."""

    max_attempts: int
    backoff_seconds: float
    lease_seconds: float  # renewed every third of it while the work runs
    poll_seconds: float


class JobSettings(Part):
    """The provisioning job runner."""

    queue: QueueSettings
    concurrency: int  # calls in flight in this runner
    lane_concurrency: int  # calls in flight per server
    # Woken while calls of an earlier pass still run: wait this long for more jobs to claim
    # in the same pass (WORKER_LINGER_MS, as the consumers' group commit); idle: at once.
    busy_linger_seconds: float = 0.0


class WhmSettings(Part):
    """cPanel & WHM servers; their tokens come from the environment (each server's token_env)."""

    scheme: Literal["https", "http"] | None  # http only for a local test server
    timeout: float


class EppSettings(Part):
    """The EPP registrar; EPP_PASSWORD is read from the environment when needed."""

    host: str | None
    port: int
    client_id: str | None
    registrant_id: str | None
    cafile: str | None
    timeout: float


class ProvidersSettings(Part):
    """Server modules and registrars (services/provisioning/providers.py)."""

    whm: WhmSettings
    epp: EppSettings


class DeadPaymentsSettings(Part):
    """The keeper of payments dead-lettered by the broker (its own connection)."""

    broker: BrokerSettings
    publishers: PublisherSettings  # a dead payment republished by a worker is still a payment
    sweep_seconds: float


class SmtpSettings(Part):
    host: str
    port: int
    username: str | None
    password: SecretStr | None
    security: Literal["none", "starttls", "tls"]
    sender: str  # MAIL_FROM
    timeout: float
    connections: int  # at most this many at once (SMTP_CONNECTIONS)


class MailSettings(Part):
    """The mail sender (services/notify/sender.py)."""

    smtp: SmtpSettings
    queue: QueueSettings

    @property
    def domain(self) -> str:
        """MAIL_FROM's domain, for Message-IDs."""
        return self.smtp.sender.rpartition("@")[2].strip(">") or "ordermill.local"


# The web console.

class ConsoleSettings(Part):
    """The console (console/): where it listens, its sessions, and who it publishes as."""

    secret_key: SecretStr | None  # signs session cookies; None: a random key per process
    url: str | None
    host: str
    port: int
    secure_cookies: bool
    session_hours: float
    signin_max_failures: int
    signin_window_minutes: float
    review_timeout: float
    # Read the dashboard's and the list's first page's pages when it starts (console/warm_up.py)
    warm_up: bool
    user: str | None  # the console's RabbitMQ user (AMQP_URL's): the user_id it publishes with
    # Whether the review service will record the signed-in operator (the user is a console
    # user and not an operator user) or the broker user itself: said once at start.
    console_users: frozenset[str]
    operator_users: frozenset[str]
    # Ordermill's own users: a dead letter a worker copied names its first publisher in a
    # header, believed only on a copy from one of these (shared/dead_letters.py).
    service_users: frozenset[str] = frozenset()


class WebhookSettings(Part):
    """Outbound webhooks (services/webhooks/): the sender's policy and the SSRF allow-list.
    `queue` gives the lease and poll (JOB_*); retries follow `retry_seconds`, not JOB_*."""

    queue: QueueSettings
    retry_seconds: tuple[float, ...]
    timeout: float
    response_limit: int
    allow_networks: tuple[str, ...]
    concurrency: int
    endpoint_concurrency: int
    give_way_seconds: float  # into a busy spell of the pipeline, deliveries wait (activity.py)
    secret_key: SecretStr | None  # Fernet key(s): signing secrets encrypted at rest
    rotation_hours: float



class AlertSettings(Part):
    """Staff alerts (services/alerts/): the sweep's broker connection and pace, the Slack
    sender's policy (the webhooks': SSRF allow-list, timeout, retries, the sealing key), and
    where alerts link to (the console's order page) and mail from."""

    broker: BrokerSettings
    webhooks: WebhookSettings
    console_url: str | None
    mail_domain: str
    sweep_seconds: float
