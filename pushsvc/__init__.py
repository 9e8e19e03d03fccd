"""pushsvc: a self-hosted WebSocket push service for web applications.

Browsers connect over WebSocket and say who they are; the web application's
backend pushes to a uid over a line-based TCP port (or HTTP) and learns whether
anybody received it.  See README.md and docs/protocol.md.
"""

__version__ = "0.1.0"
