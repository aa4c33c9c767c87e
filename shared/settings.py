"""Settings from the environment, with working local defaults (docs/contract.md, section 6).

`Settings` reads the environment, flat: its field names are the variable names, the
operators' contract. Components never take it whole: each takes its part, a small frozen
model built here (`settings.fraud`, `settings.maxmind`, `settings.jobs`, ...; see
shared/settings_parts.py). Only the worker factories (`services/*/worker.py`), the Runtime,
the test harness and the CLI hold the whole of it, to hand the parts out."""

from __future__ import annotations

import ipaddress
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.settings_parts import (
    AlertSettings,
    BannedSettings,
    BrokerSettings,
    ConsoleSettings,
    DeadPaymentsSettings,
    EppSettings,
    FraudLabsProSettings,
    FraudSettings,
    HousekeepingSettings,
    JobSettings,
    MailSettings,
    MaxMindSettings,
    MetricsSettings,
    PipelineSettings,
    ProvidersSettings,
    PublisherSettings,
    QueueSettings,
    RelaySettings,
    RulesSettings,
    ScreeningSweepSettings,
    SmtpSettings,
    SupervisorSettings,
    WebhookSettings,
    WhmSettings,
    amqp_urls,
    amqp_user,
    hide_password,
)

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    # An empty variable (compose's `${X:-}`) means "not set": the default applies.
    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True,
                                      env_ignore_empty=True)

    # One URL, or a cluster's nodes comma-separated (`amqp://u:p@rmq1/,amqp://u:p@rmq2/`): a
    # connection goes to the first that answers and moves on when its node goes. Hidden from
    # the repr: it carries the password.
    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", repr=False)
    # The AMQP password from a file (a Docker or Kubernetes secret), put into AMQP_URL: a
    # password in the environment shows in `docker inspect` and process listings.
    amqp_password_file: str | None = None
    database_url: str = "postgresql://postgres@127.0.0.1:5432/ordermill"
    # Behind PgBouncer in transaction pooling (DATABASE_URL names PgBouncer): asyncpg's
    # statement cache off, and no LISTEN through it (see `listen_url`).
    db_pgbouncer: bool = False
    # The database itself, not through a pooler: for LISTEN (the relay's, job runner's and
    # mail sender's wake-ups) and creating the database. Unset: DATABASE_URL.
    database_direct_url: str | None = None
    ordermill_namespace: str = Field("ordermill", pattern=r"^[A-Za-z0-9_.-]+$")

    fraud_provider: Literal["rules", "maxmind", "fraudlabspro"] = "rules"
    fraud_threshold: Decimal = Field(Decimal("20"), ge=0, le=100)
    # The review band (issue 16): an order scoring over this (and at most FRAUD_THRESHOLD)
    # stays Pending marked needs review. Unset: no band (off by default).
    fraud_review_threshold: Decimal | None = Field(None, ge=0, le=100)
    fraud_skip_existing_clients: bool = False
    fraud_banned_email_domains: CommaList = []
    fraud_banned_ips: CommaList = []
    # Rules scorer knobs: what counts as a burst and a large first order.
    fraud_velocity_window_minutes: int = Field(60, gt=0)
    fraud_velocity_max_orders: int = Field(3, gt=0)
    # "500" is in the catalog's default currency; "500,EUR:450,JPY:75000" names others. A
    # currency without an amount is not checked (500 yen is no large order).
    fraud_large_first_order: Annotated[dict[str, Decimal], NoDecode] = {"": Decimal("500.00")}
    # When the provider cannot score: keep the order Pending for review (hold), make it
    # Fraud, or let it through unscreened (pass, recorded as such).
    fraud_on_error: Literal["hold", "fraud", "pass"] = "hold"

    # MaxMind minFraud (FRAUD_PROVIDER=maxmind).
    maxmind_account_id: int | None = None
    maxmind_license_key: SecretStr | None = None
    maxmind_service: Literal["score", "insights", "factors"] = "score"
    maxmind_host: str = "minfraud.maxmind.com"  # sandbox.maxmind.com for the sandbox
    maxmind_timeout: float = Field(5.0, gt=0, le=60)  # the package's own default is 60 s
    maxmind_attempts: int = Field(3, gt=0, le=10)  # timeouts, connection errors and 5xx
    maxmind_hash_email: bool = False  # send the address as an MD5, the domain in clear
    # WHMCS's rejection options.
    maxmind_reject_free_email: bool = False
    maxmind_reject_country_mismatch: bool = False  # Insights or Factors
    maxmind_reject_anonymous_proxy: bool = False  # Insights or Factors
    maxmind_high_risk_countries: CommaList = []  # ISO codes; empty: the option is off

    # FraudLabs Pro (FRAUD_PROVIDER=fraudlabspro): its v2 REST API.
    fraudlabspro_api_key: SecretStr | None = None
    fraudlabspro_host: str = "api.fraudlabspro.com"  # host[:port], always https
    fraudlabspro_timeout: float = Field(5.0, gt=0, le=60)
    fraudlabspro_attempts: int = Field(3, gt=0, le=10)  # timeouts, connection errors and 5xx

    # Worker runtime.
    worker_prefetch: int = Field(32, gt=0, le=1000)
    # Transactions at once per worker, and messages at most in one transaction under load.
    worker_concurrency: int = Field(4, gt=0, le=100)
    worker_batch: int = Field(16, gt=0, le=500)
    # Group commit: while a worker handles a batch, a message taken meanwhile waits up to this
    # long for more to share its transaction; an idle worker starts at once unless its messages
    # flow (WORKER_FLOW_GAP_MS, below); 0: never waits.
    # It stops early when the batch in hand ends. 25 rather than 5: at a steady 80 % of the
    # burst's rate, 5 ms batches too little and the backlog grew (docs/performance.md, "Sustained load");
    # 40 rather than 25 since stop 31, with the flow's threshold apart (below).
    worker_linger_ms: float = Field(40.0, ge=0, le=1000)
    # An idle worker whose messages arrive on average less than this apart (a flow) waits for
    # the next one too (while it is due, up to WORKER_LINGER_MS; a gap over the linger counts
    # as the linger, and 0 means no flow). Apart from the linger: at 40
    # a 30/s stream (33 ms apart) waited at every hop ("A longer busy linger", docs/performance.md).
    worker_flow_gap_ms: float = Field(25.0, ge=0, le=1000)
    # A message over this is dead-lettered unread: an order is a few kilobytes.
    max_message_bytes: int = Field(1_048_576, ge=1024)
    queue_delivery_limit: int = Field(20, ge=2)
    # Replicas of each quorum queue when first declared (x-quorum-initial-group-size), for a
    # cluster: 3 on three nodes. Unset: RabbitMQ's default. An existing queue keeps its own.
    queue_replicas: int | None = Field(None, ge=1)
    startup_attempts: int = Field(30, gt=0)
    # How `ordermill run` lays its workers out in processes (services/layout.py): `auto` (the
    # order path, provisioning and the rest in three processes on two or more cores), `1`
    # (one process), or groups such as `placement,fraud/provisioning,review/notify,webhooks,alerts`.
    worker_processes: str = Field("auto", min_length=1)
    # A worker applies missing migrations at start (the quick start's one user). Off where
    # workers use a DML-only role: the owner runs `ordermill migrate`, workers only check.
    migrate_on_start: bool = True
    transient_attempts: int = Field(5, gt=0)
    db_pool_max: int = Field(10, gt=1)
    relay_batch: int = Field(500, gt=0)
    relay_sweep_seconds: float = Field(5.0, gt=0)
    relay_linger_ms: float = Field(3.0, ge=0, le=1000)
    relay_concurrency: int = Field(4, gt=0, le=64)  # passes in flight, waiting for confirms
    screening_stuck_seconds: int = Field(120, gt=0)
    screening_max_redrives: int = Field(5, ge=0)
    # Published events, dedupe rows, finished jobs and sent mails are kept this long, then
    # deleted (shared/housekeeping.py) in batches of HOUSEKEEPING_BATCH rows, a pause between.
    outbox_retention_hours: float = Field(72, gt=0)
    inbox_retention_days: float = Field(30, gt=0)
    job_retention_days: float = Field(90, gt=0)
    email_retention_days: float = Field(90, gt=0)
    # Staff alerts and their Slack messages (services/alerts/): kept this long, then deleted
    # (a Slack message not delivered yet stays). An alert deleted no longer deduplicates:
    # an order still waiting for review after this long alerts once more.
    alert_retention_days: float = Field(90, gt=0)
    # Delivered and cancelled webhook deliveries (and their attempts): a replay
    # (`ordermill webhooks replay`) needs the row, so it must outlive the operator's look.
    webhook_retention_days: float = Field(30, gt=0)
    housekeeping_seconds: float = Field(600, gt=0)
    housekeeping_batch: int = Field(1000, gt=0, le=100_000)
    housekeeping_pause_ms: float = Field(50, ge=0, le=60_000)
    # Touched while the worker can work (broker connected, database answering): a
    # container's health check reads its age. Unset: no file.
    heartbeat_file: str | None = None
    heartbeat_seconds: float = Field(10, gt=0)
    # Prometheus: /metrics on this port (0: any free one); unset, no endpoint and no message
    # metrics. On 127.0.0.1 unless METRICS_HOST says otherwise (0.0.0.0 in a container).
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Counts read from the database (outbox backlog, jobs, emails) are read again at most
    # this often, however many scrapes come.
    metrics_cache_seconds: float = Field(5.0, ge=0)

    # Who may publish what (shared/parties.py): RabbitMQ users, comma-separated. A worker
    # serving a route nobody may send refuses to start, unless trust_any_publisher is set.
    storefront_users: CommaList = []  # order.place
    payment_publishers: CommaList = []  # payment.received (gateways)
    operator_users: CommaList = []  # review.command, order.place (no invoice), replays
    console_users: CommaList = []  # the web console: as operators, naming who signed in
    service_users: CommaList = []  # Ordermill's workers (the worker's own user always is)
    trust_any_publisher: bool = False  # development only: anyone may publish anything

    # Payments and provisioning.
    # How often the provisioning worker takes payments out of its dead-letter queue (broker
    # expiry, delivery limit) and keeps them as unapplied payments.
    dead_payment_sweep_seconds: float = Field(30.0, gt=0)
    job_max_attempts: int = Field(6, gt=0)
    job_backoff_seconds: float = Field(30.0, gt=0)
    # Renewed every third of it while the call runs (however long), so a dead runner's jobs
    # and mails are taken over within this (plus a poll). Also the mail sender's lease.
    job_lease_seconds: float = Field(30.0, gt=0)
    job_concurrency: int = Field(64, gt=0, le=1000)
    job_lane_concurrency: int = Field(8, gt=0, le=1000)  # per server
    job_poll_seconds: float = Field(5.0, gt=0)
    module_timeout_seconds: float = Field(10.0, gt=0)
    whm_scheme: Literal["https", "http"] | None = None  # http only for a local test server
    epp_host: str | None = None
    epp_port: int = 700
    epp_client_id: str | None = None
    epp_registrant_id: str | None = None  # the registrant contact set up at the registry
    epp_cafile: str | None = None  # EPP_PASSWORD is read from the environment when needed

    # Mail.
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None  # a secret: from the environment only
    smtp_security: Literal["none", "starttls", "tls"] = "none"
    # The most SMTP connections the mail sender keeps at once: a ceiling, not a count opened
    # at once. As Postfix's destination concurrency (initial 5, limit 20) the sender starts at
    # min(4, this), doubles while a backlog wants more and every connection opens, keeps to
    # what a server took when it refused more (for a minute, then one more is asked for), and
    # probes a server that took none with one connection a pass. Each mail over one costs four
    # round trips (MAIL, RCPT, DATA, the message), so a sender's pace is connections / (4 x
    # round trip): 4 connections sent about 170 mails/s at 80 % of the full-flow burst on 2
    # cores, less than the 270 it asked for (docs/performance.md, "Customer mail at the
    # steady rate").
    smtp_connections: int = Field(16, ge=1, le=100)
    mail_from: str = "Ordermill <billing@ordermill.local>"

    # The web console (console/, README "Console"). Its cookie-signing key: unset, a random
    # one per process (sessions end when it stops, and two consoles would not share them).
    console_secret_key: SecretStr | None = Field(None, min_length=32)
    console_url: str | None = None  # where operators reach it (printed; links in logs)
    console_host: str = "127.0.0.1"  # 0.0.0.0 only behind a firewall or a proxy
    console_port: int = Field(8080, ge=0, le=65535)
    # Cookies marked Secure (behind HTTPS); a request that came over https marks them anyway.
    console_secure_cookies: bool = False
    console_session_hours: float = Field(12, gt=0, le=24 * 30)
    # Sign-in attempts: this many failures in the window, per account and per address, and
    # further attempts are refused until the window has passed.
    console_signin_max_failures: int = Field(5, gt=0)
    console_signin_window_minutes: float = Field(15, gt=0)
    console_review_timeout: float = Field(10, gt=0, le=120)  # seconds to wait for an answer
    # At start and after its database server restarted, read in the background what the
    # dashboard and the pending list's first page read (console/warm_up.py).
    console_warm_up: bool = True

    # Outbound webhooks (services/webhooks/, docs/contract.md section 10).
    # Networks (CIDRs) an endpoint may be in although they are not public (loopback,
    # private, link-local, CGNAT...): an integrator's receiver on the LAN, a test's on
    # 127.0.0.1. Plain http:// is allowed only to these; every other endpoint is https.
    webhook_allow_networks: CommaList = []
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=300)  # one attempt, all in
    webhook_response_limit_bytes: int = Field(65_536, ge=512, le=16_777_216)  # read at most
    # The wait before each retry (seconds; +-10 % jitter): the Standard Webhooks / Svix
    # schedule (5 s, 5 min, 30 min, 2 h, 5 h, 10 h), its last wait cut so that the retries
    # end 24 hours after the first attempt; then the delivery is parked.
    webhook_retry_seconds: Annotated[tuple[float, ...], NoDecode] = (
        5, 300, 1800, 7200, 18000, 36000, 23095)
    webhook_concurrency: int = Field(32, gt=0, le=1000)  # requests in flight per process
    webhook_endpoint_concurrency: int = Field(4, gt=0, le=1000)  # per endpoint
    # For this long into a busy spell of the order pipeline in the same process, the sender
    # holds its deliveries (a burst of orders is served first); 0: never holds them.
    webhook_give_way_seconds: float = Field(30.0, ge=0, le=3600)
    # Fernet key(s) that encrypt the endpoints' signing secrets at rest (as EPP_CODE_KEY);
    # several comma-separated rotate: the first encrypts, any decrypts.
    webhook_secret_key: SecretStr | None = None
    # After `ordermill webhooks rotate`, the old secret still signs (a second signature) this long.
    webhook_rotation_hours: float = Field(24.0, ge=0, le=24 * 30)

    # Staff alerts (services/alerts/, README "Staff alerts"): how often the alerts worker
    # looks for orders waiting for review too long and for dead letters (seconds).
    alert_sweep_seconds: float = Field(60, gt=0)

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"

    @field_validator("fraud_banned_email_domains", "fraud_banned_ips", mode="before")
    @classmethod
    def _split_lower(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @field_validator("fraud_large_first_order", mode="before")
    @classmethod
    def _amounts_by_currency(cls, value: object) -> object:
        if not isinstance(value, str | int | Decimal):
            return value
        amounts: dict[str, object] = {}
        for part in str(value).split(","):
            if part.strip():
                currency, _, amount = part.strip().rpartition(":")
                amounts[currency.strip().upper()] = amount.strip()
        return amounts

    @field_validator("fraud_large_first_order")
    @classmethod
    def _positive_amounts(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        for currency, amount in value.items():
            if currency and not re.fullmatch(r"[A-Z]{3}", currency):
                raise ValueError(f"{currency!r} is not a currency code")
            if not amount > 0:
                raise ValueError(f"{amount} is not a positive amount")
        return value

    @model_validator(mode="after")
    def _review_band_under_threshold(self) -> Settings:
        if (self.fraud_review_threshold is not None
                and self.fraud_review_threshold >= self.fraud_threshold > 0):
            raise ValueError(f"FRAUD_REVIEW_THRESHOLD ({self.fraud_review_threshold}) must be"
                             f" under FRAUD_THRESHOLD ({self.fraud_threshold})")
        return self

    @field_validator("fraud_banned_ips")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return value

    @field_validator("webhook_allow_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_allow_networks")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP network (CIDR)") from None
        return value

    @field_validator("webhook_retry_seconds", mode="before")
    @classmethod
    def _seconds_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("webhook_retry_seconds")
    @classmethod
    def _positive_waits(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(wait <= 0 for wait in value):
            raise ValueError("every wait must be positive seconds")
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        urls = amqp_urls(value)
        if not urls:
            raise ValueError("no URL")
        for url in urls:
            if urlsplit(url).scheme not in ("amqp", "amqps") or not urlsplit(url).hostname:
                raise ValueError(f"{hide_password(url)!r} is not an amqp:// or amqps:// URL"
                                 " with a host")
        # A worker publishes with its connection's user as user_id, which the broker checks:
        # every node must be reached as the same user (and in the same virtual host).
        if len({(urlsplit(url).username, urlsplit(url).path.strip("/")) for url in urls}) > 1:
            raise ValueError("the URLs of AMQP_URL name different users or virtual hosts:"
                             " a cluster's nodes are reached as one user, in one virtual host")
        return ",".join(urls)

    @field_validator("database_url", "database_direct_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("postgres", "postgresql"):
            raise ValueError(f"{urlsplit(value).scheme or value!r} is not a postgresql:// URL")
        return value

    @field_validator("maxmind_high_risk_countries", mode="before")
    @classmethod
    def _split_upper(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().upper() for part in value.split(",") if part.strip()]
        return value

    @field_validator("storefront_users", "payment_publishers", "operator_users", "console_users",
                     "service_users", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("amqp_password_file")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                Path(value).read_text()
            except OSError as exc:
                raise ValueError(f"cannot read {value!r} ({exc.strerror})") from None
        return value

    @model_validator(mode="after")
    def _password_from_file(self) -> Settings:
        if self.amqp_password_file:
            password = quote(Path(self.amqp_password_file).read_text().strip(), safe="")
            filled = []
            for url in amqp_urls(self.amqp_url):  # every node's URL
                parts = urlsplit(url)
                netloc = f"{parts.username or ''}:{password}@{parts.netloc.rpartition('@')[2]}"
                filled.append(urlunsplit(parts._replace(netloc=netloc)))
            object.__setattr__(self, "amqp_url", ",".join(filled))
        return self

    @property
    def namespace(self) -> str:
        return self.ordermill_namespace

    @property
    def statement_cache_size(self) -> int:
        """asyncpg's prepared statement cache per connection: none behind PgBouncer, where a
        statement prepared on one server connection is run on another."""
        return 0 if self.db_pgbouncer else 100  # asyncpg's default

    @property
    def listen_url(self) -> str | None:
        """Where the wake-ups LISTEN: a LISTEN belongs to a server session, which PgBouncer in
        transaction pooling gives back after each transaction (its notifications go to no one).
        DATABASE_DIRECT_URL if set; behind PgBouncer without it, none: timers only."""
        if self.database_direct_url:
            return self.database_direct_url
        return None if self.db_pgbouncer else self.database_url

    @property
    def direct_url(self) -> str:
        """The database itself, for what a pooler cannot pass (CREATE DATABASE)."""
        return self.database_direct_url or self.database_url

    # The parts. Plain properties, built when asked (at a component's construction): a
    # cached one would survive `model_copy(update=...)` and hand out stale values.

    @property
    def broker(self) -> BrokerSettings:
        return BrokerSettings(amqp_url=self.amqp_url, namespace=self.namespace,
                              startup_attempts=self.startup_attempts)

    @property
    def publishers(self) -> PublisherSettings:
        return PublisherSettings(
            storefront_users=frozenset(self.storefront_users),
            payment_publishers=frozenset(self.payment_publishers),
            operator_users=frozenset(self.operator_users),
            console_users=frozenset(self.console_users),
            service_users=frozenset(self.service_users),
            trust_any_publisher=self.trust_any_publisher, own_user=amqp_user(self.amqp_url))

    @property
    def pipeline(self) -> PipelineSettings:
        return PipelineSettings(transient_attempts=self.transient_attempts,
                                max_message_bytes=self.max_message_bytes)

    @property
    def relay(self) -> RelaySettings:
        return RelaySettings(batch=self.relay_batch, sweep_seconds=self.relay_sweep_seconds,
                             linger_seconds=self.relay_linger_ms / 1000,
                             concurrency=self.relay_concurrency,
                             busy_linger_seconds=self.worker_linger_ms / 1000)

    @property
    def metrics(self) -> MetricsSettings:
        return MetricsSettings(port=self.metrics_port, host=self.metrics_host,
                               cache_seconds=self.metrics_cache_seconds)

    @property
    def supervisor(self) -> SupervisorSettings:
        return SupervisorSettings(heartbeat_file=self.heartbeat_file,
                                  heartbeat_seconds=self.heartbeat_seconds, metrics=self.metrics)

    @property
    def housekeeping(self) -> HousekeepingSettings:
        return HousekeepingSettings(outbox_retention_hours=self.outbox_retention_hours,
                                    inbox_retention_days=self.inbox_retention_days,
                                    job_retention_days=self.job_retention_days,
                                    email_retention_days=self.email_retention_days,
                                    alert_retention_days=self.alert_retention_days,
                                    webhook_retention_days=self.webhook_retention_days,
                                    every_seconds=self.housekeeping_seconds,
                                    batch=self.housekeeping_batch,
                                    pause_seconds=self.housekeeping_pause_ms / 1000)

    @property
    def banned(self) -> BannedSettings:
        return BannedSettings(email_domains=tuple(self.fraud_banned_email_domains),
                              ips=tuple(self.fraud_banned_ips))

    @property
    def fraud(self) -> FraudSettings:
        return FraudSettings(
            provider=self.fraud_provider, threshold=self.fraud_threshold,
            review_threshold=self.fraud_review_threshold,
            skip_existing_clients=self.fraud_skip_existing_clients,
            on_error=self.fraud_on_error,
            velocity_window_minutes=self.fraud_velocity_window_minutes,
            operator_users=frozenset(self.operator_users), banned=self.banned)

    @property
    def screening_sweep(self) -> ScreeningSweepSettings:
        return ScreeningSweepSettings(stuck_seconds=self.screening_stuck_seconds,
                                      max_redrives=self.screening_max_redrives)

    @property
    def rules(self) -> RulesSettings:
        return RulesSettings(velocity_max_orders=self.fraud_velocity_max_orders,
                             large_first_order=self.fraud_large_first_order, banned=self.banned)

    @property
    def maxmind(self) -> MaxMindSettings:
        return MaxMindSettings(
            account_id=self.maxmind_account_id, license_key=self.maxmind_license_key,
            service=self.maxmind_service, host=self.maxmind_host, timeout=self.maxmind_timeout,
            attempts=self.maxmind_attempts, hash_email=self.maxmind_hash_email,
            reject_free_email=self.maxmind_reject_free_email,
            reject_country_mismatch=self.maxmind_reject_country_mismatch,
            reject_anonymous_proxy=self.maxmind_reject_anonymous_proxy,
            high_risk_countries=frozenset(self.maxmind_high_risk_countries))

    @property
    def fraudlabspro(self) -> FraudLabsProSettings:
        return FraudLabsProSettings(
            api_key=self.fraudlabspro_api_key, host=self.fraudlabspro_host,
            timeout=self.fraudlabspro_timeout, attempts=self.fraudlabspro_attempts)

    @property
    def leased_queue(self) -> QueueSettings:
        return QueueSettings(max_attempts=self.job_max_attempts,
                             backoff_seconds=self.job_backoff_seconds,
                             lease_seconds=self.job_lease_seconds,
                             poll_seconds=self.job_poll_seconds)

    @property
    def jobs(self) -> JobSettings:
        return JobSettings(queue=self.leased_queue, concurrency=self.job_concurrency,
                           lane_concurrency=self.job_lane_concurrency,
                           busy_linger_seconds=self.worker_linger_ms / 1000)

    @property
    def providers(self) -> ProvidersSettings:
        return ProvidersSettings(
            whm=WhmSettings(scheme=self.whm_scheme, timeout=self.module_timeout_seconds),
            epp=EppSettings(host=self.epp_host, port=self.epp_port,
                            client_id=self.epp_client_id, registrant_id=self.epp_registrant_id,
                            cafile=self.epp_cafile, timeout=self.module_timeout_seconds))

    @property
    def dead_payments(self) -> DeadPaymentsSettings:
        return DeadPaymentsSettings(broker=self.broker, publishers=self.publishers,
                                    sweep_seconds=self.dead_payment_sweep_seconds)

    @property
    def console(self) -> ConsoleSettings:
        return ConsoleSettings(
            secret_key=self.console_secret_key, url=self.console_url, host=self.console_host,
            port=self.console_port, secure_cookies=self.console_secure_cookies,
            session_hours=self.console_session_hours,
            signin_max_failures=self.console_signin_max_failures,
            signin_window_minutes=self.console_signin_window_minutes,
            review_timeout=self.console_review_timeout, warm_up=self.console_warm_up,
            user=amqp_user(self.amqp_url),
            console_users=frozenset(self.console_users),
            operator_users=frozenset(self.operator_users),
            service_users=frozenset(self.service_users) | (
                {own} if (own := amqp_user(self.amqp_url)) else set()))

    @property
    def mail(self) -> MailSettings:
        return MailSettings(smtp=SmtpSettings(
            host=self.smtp_host, port=self.smtp_port, username=self.smtp_username,
            password=self.smtp_password, security=self.smtp_security, sender=self.mail_from,
            timeout=self.module_timeout_seconds, connections=self.smtp_connections),
            queue=self.leased_queue)

    @property
    def alerts(self) -> AlertSettings:
        return AlertSettings(broker=self.broker, webhooks=self.webhooks,
                             console_url=self.console_url, mail_domain=self.mail.domain,
                             sweep_seconds=self.alert_sweep_seconds)

    @property
    def webhooks(self) -> WebhookSettings:
        return WebhookSettings(
            queue=self.leased_queue, retry_seconds=self.webhook_retry_seconds,
            timeout=self.webhook_timeout_seconds,
            response_limit=self.webhook_response_limit_bytes,
            allow_networks=tuple(self.webhook_allow_networks),
            concurrency=self.webhook_concurrency,
            endpoint_concurrency=self.webhook_endpoint_concurrency,
            give_way_seconds=self.webhook_give_way_seconds,
            secret_key=self.webhook_secret_key, rotation_hours=self.webhook_rotation_hours)
