"""bench/sustained.py names each worker process by the services it runs, so its report can
say which group of services costs what an order (`worker ms/order by process`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import ModuleType

import psutil
import pytest


@pytest.fixture
def sustained(benches: Callable[[str], ModuleType]) -> ModuleType:
    return benches("sustained")


def test_worker_processes_are_named_by_their_services(sustained: ModuleType) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                              "--processes", "1", "notify", "webhooks", "alerts"])
    parent = subprocess.Popen(["bash", "-c", "sleep 30 & wait"], start_new_session=True)
    lone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)  # the parent's child started
        assert sustained.process_label(child.pid) == "notify,webhooks,alerts"
        assert sustained.process_label(parent.pid) == "supervisor"
        assert sustained.process_label(lone.pid) == "worker"
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # its sleep too
        for p in (child, parent, lone):
            p.kill()
            p.wait()
    assert sustained.process_label(child.pid) == str(child.pid)  # gone: its pid


def test_processes_of_one_label_are_added(sustained: ModuleType) -> None:
    lone = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            for _ in range(2)]
    try:
        seconds = {lone[0].pid: 1.0, lone[1].pid: 0.5}
        assert sustained.by_process(seconds, 100) == {"worker": 15.0}
    finally:
        for p in lone:
            p.kill()
            p.wait()

