"""One INFO line per tracked call on the ``usage_callbacks`` logger."""

from __future__ import annotations

import logging

from usage_callbacks.store.models import UsageRecord
from usage_callbacks.usage import COUNT_FIELDS

#: Shown after the totals when not zero: the parts (cache, audio, image, tool-use
#: prompt, reasoning) and the per-request units.
_PARTS = tuple(
    name
    for name in COUNT_FIELDS
    if name not in ("prompt_tokens", "completion_tokens", "embedding_tokens")
)


class LogExporter:
    """Logs ``Token usage: prompt=1234, completion=567, total=1801, embedding=0, ...``."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self.logger = logger or logging.getLogger("usage_callbacks")
        self.level = level

    def export(self, record: UsageRecord) -> None:
        if not self.logger.isEnabledFor(self.level):
            return
        self.logger.log(
            self.level,
            "Token usage: prompt=%d, completion=%d, total=%d, embedding=%d, model=%s, cost=$%s%s%s",
            record.prompt_tokens,
            record.completion_tokens,
            record.total_tokens,
            record.embedding_tokens,
            record.model or "unknown",
            f"{record.cost_estimate_usd:.6f}",
            " (estimated)" if record.estimated else "",
            "".join(
                f", {name.removesuffix('_tokens')}={value}"
                for name in _PARTS
                if (value := getattr(record, name))
            ),
        )
