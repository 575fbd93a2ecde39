"""The clients of BlueMarble: the routing client game servers use (:mod:`.routing`), the
trade client (:mod:`.trades`) and the control-plane client (:mod:`.control_plane`).

Logging: the library logs through structlog. When the application has not configured
structlog, the library's lines go to the standard library's ``logging`` instead, under
logger names ``bluemarble.*``, so the application's own logging set-up decides what is
shown and where (by default: warnings and errors on stderr, nothing on stdout). Without
this, structlog's default would print every debug line of the library to stdout.
"""

from __future__ import annotations

import structlog

if not structlog.is_configured():
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.processors.KeyValueRenderer(key_order=["event"]),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
