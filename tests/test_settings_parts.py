"""Each component's part of the settings: built from the one flat Settings, only its own
fields, frozen, and no secret in its repr. No server needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from shared.settings import Settings
from shared.settings_parts import (
    BrokerSettings,
    MaxMindSettings,
    Part,
    QueueSettings,
    SmtpSettings,
)

ROOT = Path(__file__).resolve().parent.parent
PARTS = sorted(name for name, value in vars(Settings).items() if isinstance(value, property)
               and isinstance(getattr(Settings(), name), Part))
SECRETS = {"maxmind_license_key": "lk-s3cret", "smtp_password": "smtp-s3cret",
           "amqp_url": "amqp://svc:amqp-s3cret@127.0.0.1:5672/",
           "database_url": "postgresql://app:db-s3cret@127.0.0.1:5432/ordermill"}


def fields(part: BaseModel) -> set[str]:
    """A part's field names, its nested parts' too."""
    names = set()
    for name in type(part).model_fields:
        value = getattr(part, name)
        names |= fields(value) if isinstance(value, BaseModel) else {name}
    return names


def test_every_part_builds_from_default_settings() -> None:
    assert set(PARTS) >= {"broker", "publishers", "pipeline", "relay", "housekeeping",
                          "banned", "fraud", "screening_sweep", "rules", "maxmind",
                          "leased_queue", "jobs", "providers", "dead_payments", "mail"}
    s = Settings()
    for name in PARTS:
        part = getattr(s, name)
        assert type(part).model_validate(part.model_dump()) == part, name  # valid and whole


def test_each_part_carries_only_its_own_fields() -> None:
    s = Settings()
    assert fields(s.maxmind) == set(MaxMindSettings.model_fields)
    assert not {"database_url", "amqp_url", "password", "smtp_password"} & fields(s.maxmind)
    owners = {"license_key": {"maxmind"}, "password": {"mail"},  # SMTP's
              # dead payments and the alerts sweep (dead-letter depths) have a connection
              "amqp_url": {"broker", "dead_payments", "alerts"}}
    for name in PARTS:
        mine = fields(getattr(s, name))
        assert "database_url" not in mine, name  # a resource the caller passes, not a part
        for field, parts in owners.items():
            assert field not in mine or name in parts, f"{name} carries {field}"
    assert fields(s.jobs) == {"concurrency", "lane_concurrency", "busy_linger_seconds",
                              *QueueSettings.model_fields}
    assert not {"smtp_host", "host", "epp_host"} & fields(s.jobs)
    # The job runner's linger when busy is the runtime's group commit's (0: never waits).
    assert Settings(worker_linger_ms=8).jobs.busy_linger_seconds == 0.008
    # The flow's threshold is its own, shorter than the busy linger (docs/performance.md,
    # "The flow's threshold apart").
    assert (Settings().worker_flow_gap_ms, Settings().worker_linger_ms) == (25, 40)
    assert Settings(worker_linger_ms=0).jobs.busy_linger_seconds == 0
    assert fields(s.providers) == {"scheme", "timeout", "host", "port", "client_id",
                                   "registrant_id", "cafile"}  # EPP_PASSWORD: environment only


def test_no_secret_shows_in_a_parts_repr() -> None:
    s = Settings(**SECRETS)
    assert isinstance(s.maxmind.license_key, SecretStr)
    assert s.maxmind.license_key.get_secret_value() == "lk-s3cret"
    smtp = s.mail.smtp
    assert isinstance(smtp.password, SecretStr) and smtp.password.get_secret_value() == "smtp-s3cret"
    assert s.broker.amqp_url == SECRETS["amqp_url"]
    assert "smtp-s3cret" not in repr(s) and "lk-s3cret" not in repr(s)  # SecretStr in Settings too
    for name in PARTS:
        part = getattr(s, name)
        for shown in (repr(part), str(part)):
            for secret in ("lk-s3cret", "smtp-s3cret", "amqp-s3cret", "db-s3cret"):
                assert secret not in shown, f"{name}: {secret} in {shown}"


def test_parts_are_frozen_and_refuse_fields_of_others() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.maxmind.host = "evil.example"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="database_url"):
        MaxMindSettings(**s.maxmind.model_dump(), database_url=s.database_url)
    with pytest.raises(ValidationError, match="amqp_url"):
        SmtpSettings(**s.mail.smtp.model_dump(), amqp_url=s.amqp_url)


def test_parts_follow_the_settings_they_are_built_from() -> None:
    """Built when asked, so a copied Settings hands out its own values, and the variables'
    meanings hold (the relay's linger is in ms, the publishers include the worker's own user)."""
    s = Settings(relay_linger_ms=250, fraud_banned_ips="192.0.2.1",
                 amqp_url="amqp://ops%40example.com:pw@127.0.0.1/", operator_users="desk")
    assert s.relay.linger_seconds == 0.25
    assert s.relay.busy_linger_seconds == 0.04  # WORKER_LINGER_MS, as the consumers'
    assert Settings(worker_linger_ms=0).relay.busy_linger_seconds == 0
    assert s.publishers.own_user == "ops@example.com"
    assert s.fraud.operator_users == {"desk"}
    assert s.fraud.banned == s.rules.banned and s.fraud.banned.ips == ("192.0.2.1",)
    assert s.mail.queue == s.jobs.queue == s.leased_queue
    copied = s.model_copy(update={"fraud_threshold": 0, "job_lease_seconds": 3.0})
    assert copied.fraud.threshold == 0 and s.fraud.threshold == 20
    assert copied.mail.queue.lease_seconds == copied.jobs.queue.lease_seconds == 3.0
    assert isinstance(s.dead_payments.broker, BrokerSettings)


def test_only_the_factories_and_the_runtime_take_the_whole_settings() -> None:
    """Components take their part; the worker factories, the registry, the Runtime and the
    broker-free harness take Settings to hand the parts out."""
    allowed = {"services/registry.py", "shared/runtime/process.py", "shared/runtime/testing.py"}
    takers = set()
    for path in [*ROOT.glob("services/**/*.py"), *ROOT.glob("shared/**/*.py")]:
        relative = path.relative_to(ROOT).as_posix()
        if re.search(r"^from shared\.settings import .*\bSettings\b", path.read_text(), re.M):
            takers.add(relative)
    factories = {t for t in takers if re.fullmatch(r"services/\w+/worker\.py", t)}
    assert takers - factories <= allowed, takers - factories - allowed
