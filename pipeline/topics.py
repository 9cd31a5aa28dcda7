"""Create the worker's topics up front, with the partition counts the settings ask for.

Faust would auto-create them on first use, but the table's changelog must have exactly as
many partitions as the edits topic, and producers may start before any worker: creating all
of them explicitly, idempotently, removes the race.
"""

from __future__ import annotations

from contextlib import suppress

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from incstream.pipeline.settings import Settings


def changelog_topic(settings: Settings, table: str | None = None) -> str:
    """The changelog topic of the documents table (or of another table of the worker)."""
    return f"{settings.app_id}-{table or settings.table_name}-changelog"


def ensure_topics(settings: Settings) -> None:
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap, client_id="incstream-admin")
    try:
        existing = set(admin.list_topics())
        wanted = {
            settings.edits_topic: settings.partitions,
            changelog_topic(settings): settings.partitions,
            changelog_topic(settings, settings.activations_table): settings.partitions,
            settings.classes_topic: settings.partitions,
            settings.dlq_topic: 1,
        }
        compacted = {"cleanup.policy": "compact"}
        missing = [
            NewTopic(
                name,
                partitions,
                replication_factor=settings.replication_factor,
                topic_configs=compacted if name.endswith("-changelog") else {},
            )
            for name, partitions in wanted.items()
            if name not in existing
        ]
        if missing:
            # TopicAlreadyExists: another process won the race, which is fine.
            with suppress(TopicAlreadyExistsError):
                admin.create_topics(missing)
    finally:
        admin.close()
