"""Task storage: every task's support set, behind one interface (`records.TaskStore`).

SQLite (`sqlite.SqliteTaskStore`) is the embedded default; Redis (`redis_store.RedisTaskStore`) the
store many replicas share. `cache.ByteLRU` keeps each process's task memories within a byte budget.
"""

from __future__ import annotations

from service.settings import Settings
from service.storage.records import Page, TaskChanged, TaskInfo, TaskStore, TaskWarning
from service.storage.sqlite import SqliteTaskStore

__all__ = ["Page", "SqliteTaskStore", "TaskChanged", "TaskInfo", "TaskStore", "TaskWarning", "open_store"]


def open_store(settings: Settings) -> TaskStore:
    """The store the settings name: Redis for a `store_url`, else SQLite under `data_dir`."""
    if settings.store_url is None:
        return SqliteTaskStore(settings.database_path)
    from service.storage.redis_store import RedisTaskStore  # redis-py is only needed by those who use it

    return RedisTaskStore(settings.store_url)
