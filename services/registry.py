"""The workers `ordermill run` knows, by service name."""

from __future__ import annotations

from collections.abc import Callable

from services.alerts.worker import worker as alerts_worker
from services.fraud.worker import worker as fraud_worker
from services.notify.worker import worker as notify_worker
from services.placement.worker import worker as placement_worker
from services.provisioning.worker import worker as provisioning_worker
from services.review.worker import worker as review_worker
from services.webhooks.worker import worker as webhooks_worker
from shared.runtime import WorkerSpec
from shared.settings import Settings

WORKERS: dict[str, Callable[[Settings], WorkerSpec]] = {
    "placement": placement_worker,
    "fraud": fraud_worker,
    "provisioning": provisioning_worker,
    "review": review_worker,
    "notify": notify_worker,
    "webhooks": webhooks_worker,
    "alerts": alerts_worker,
}
