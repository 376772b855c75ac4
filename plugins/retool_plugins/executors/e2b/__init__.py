"""E2BExecutor: each session's cells run in an E2B cloud sandbox.

The parts: ``executor.py`` (the plugin: sessions, retries, the live-sandbox limit, results) and ``_support.py``
(what a failed request means, the lazy SDK import, the exit-time kill). The SDK is imported only when a sandbox
is first created.
"""

from retool_plugins.executors.e2b.executor import E2BExecutor

__all__ = ["E2BExecutor"]
