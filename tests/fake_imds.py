"""Moved to tests/support/fake_imds.py (import `support.fake_imds`). This name stays only while
tests/acceptance/test_cluster_path.py still imports it: there the service starts when it is made."""

from __future__ import annotations

from support import fake_imds
from support.fake_imds import TOKEN

__all__ = ["TOKEN", "FakeMetadata"]


class FakeMetadata(fake_imds.FakeMetadata):
    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self.start()
