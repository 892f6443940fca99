"""A process-wide on/off setting with a scoped override."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Toggle:
    """``enabled`` is read where the setting applies; ``scoped(value)`` changes it inside a block."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @contextlib.contextmanager
    def scoped(self, enabled: bool) -> Iterator[None]:
        previous, self.enabled = self.enabled, bool(enabled)
        try:
            yield
        finally:
            self.enabled = previous
