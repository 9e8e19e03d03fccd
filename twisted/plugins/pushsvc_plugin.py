"""The ``twistd push`` plugin.

Kept import-light on purpose: twistd imports every plugin module to list
them, so the service code is only imported by ``ServiceMaker`` when ``push``
is actually run.
"""

from twisted.application.service import ServiceMaker

pushsvc = ServiceMaker(
    "pushsvc",
    "pushsvc.tap",
    "A WebSocket push service: browsers subscribe by uid, backends push over TCP.",
    "push",
)
