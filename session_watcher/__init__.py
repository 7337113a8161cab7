"""session-watcher: copies users' session transcripts into a central store, atomically.

Library use::

    from session_watcher import Config, reconcile
    stats = reconcile(Config(home_root=Path("/home"), target=Path("/data/user_sessions")))
    print(stats.as_dict())
"""

__version__ = "0.1.0"  # first: modules imported below read it

from .config import Config, ConfigError
from .reconcile import PassStats, reconcile

__all__ = ["Config", "ConfigError", "PassStats", "__version__", "reconcile"]
