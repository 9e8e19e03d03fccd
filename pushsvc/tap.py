"""twistd glue: ``twistd push`` options and the service tree.

Modelled on ``twisted.words.tap``: one node service, one protocol factory
per transport, each listening on a ``strports`` endpoint description, all in
one MultiService.  This is the one place that chooses the broker and the
history store: memory for one node, Redis with ``--redis``.
"""

from __future__ import annotations

from typing import Any

import txaio
from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage
from txaio.interfaces import log_levels

from pushsvc.auth import API_KEY_ENV, MIN_KEY_BYTES, SECRET_ENV, load_secret
from pushsvc.backend import (
    BACKEND_SECRET_ENV,
    DEFAULT_MAX_PENDING,
    BackendFactory,
    BackendGate,
    default_max_backends,
)
from pushsvc.broker.memory import MemoryBroker
from pushsvc.broker.shard import parse_redis_url
from pushsvc.browser import FactoryService
from pushsvc.compat import quiet_autobahn_debug
from pushsvc.drain import Drain
from pushsvc.gcpolicy import full_collections
from pushsvc.heaptrim import trimmer
from pushsvc.history.store import DEFAULT_SIZE, MAX_TTL, MemoryStore
from pushsvc.http import make_metrics_site, make_site
from pushsvc.listeners import Listener, check_endpoint
from pushsvc.node import Node
from pushsvc.policy import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_HANDSHAKE,
    DEFAULT_MAX_QUEUE,
    FailureThrottle,
    OriginPolicy,
    default_max_connections,
)
from pushsvc.settings import Reloadable, ReloadOnHangup, Settings
from pushsvc.websocket import PushServerFactory

log = Logger()

LOCAL = "127.0.0.1"  # the backend and HTTP ports listen here unless given an endpoint

# Limits and access control (docs/security.md lists each with its error or close code).
LIMIT_PARAMETERS = [
    [
        "drain-window",
        None,
        2.0,
        "Seconds over which shutdown spreads its 1001 closes, in random order (0: all at once).",
        float,
    ],
    [
        "max-queue",
        None,
        DEFAULT_MAX_QUEUE,
        "Bytes a WebSocket may have waiting beyond the socket buffer before it is closed "
        "as a slow consumer (4010; 0: no limit).",
        int,
    ],
    [
        "max-connections",
        None,
        0,
        "WebSocket connections in all, counted from accept; more get HTTP 503 and are "
        "closed at once (0: the fd limit minus 100).",
        int,
    ],
    [
        "max-handshake",
        None,
        DEFAULT_MAX_HANDSHAKE,
        "Bytes of request line and headers a WebSocket handshake (on --ws-port and /ws) may "
        "send; more get HTTP 431 (--ws-port) or 400 (the HTTP port).",
        int,
    ],
    [
        "handshake-timeout",
        None,
        DEFAULT_HANDSHAKE_TIMEOUT,
        "Seconds from accept within which the request line and headers must have arrived "
        "(both ports; also the HTTP port's idle timeout); then HTTP 408 and close.",
        float,
    ],
    ["max-per-uid", None, 0, "Connections per uid; more are closed with 4029 (0: no limit).", int],
    [
        "max-per-ip",
        None,
        0,
        "WebSocket connections per client IP, counted from accept; more get HTTP 429 and are "
        "closed at once (0: no limit).",
        int,
    ],
    [
        "trust-x-forwarded-for",
        None,
        0,
        "Proxies in front of --ws-port whose X-Forwarded-For entries give the client IP "
        "(0: ignore the header).",
        int,
    ],
    [
        "client-rate",
        None,
        10.0,
        "Frames a second a browser may send on average; over it: close 1008 (0: no limit).",
        float,
    ],
    ["client-burst", None, 20, "Frames a browser may send at once within --client-rate.", int],
    [
        "allowed-origins",
        None,
        None,
        "Comma-separated origins allowed to connect (https://app.example.com, "
        "https://*.example.com, null); others get HTTP 403. Default: any.",
    ],
    [
        "allowed-origins-file",
        None,
        None,
        "File of allowed origins (one a line or comma-separated), re-read on SIGHUP; "
        "overrides --allowed-origins.",
    ],
    [
        "backend-secret-file",
        None,
        None,
        f"File holding a secret backends must send first (or set ${BACKEND_SECRET_ENV}).",
    ],
    [
        "max-backends",
        None,
        0,
        "Backend connections in all; more get 'error too many backend connections' "
        "(0: a tenth of the WebSocket cap, at least 64).",
        int,
    ],
    [
        "max-backend-pending",
        None,
        DEFAULT_MAX_PENDING,
        "Backend connections that have not sent the backend secret yet; more are closed "
        "(0: no limit).",
        int,
    ],
    [
        "auth-fail-limit",
        None,
        10,
        "Failed backend secrets or API keys from one IP within 60 s before it is refused "
        "for 60 s (0: no limit).",
        int,
    ],
]


def check_limit_options(config: usage.Options) -> None:
    """Validate the limit options; parse the origin list and read the backend secret."""
    for name in (
        "drain-window",
        "max-queue",
        "max-connections",
        "max-per-uid",
        "max-per-ip",
        "trust-x-forwarded-for",
        "client-rate",
        "client-burst",
        "max-backends",
        "max-backend-pending",
        "auth-fail-limit",
    ):
        if config[name] < 0:
            raise usage.UsageError(f"--{name} {config[name]!r}: must not be negative")
    try:
        config["origins-text"] = origins_text(config)
        config["origins"] = OriginPolicy.parse(config["origins-text"])
    except (OSError, ValueError) as e:
        raise usage.UsageError(f"--allowed-origins: {e}") from None
    try:
        config["backend-secret"] = load_secret(
            config["backend-secret-file"], BACKEND_SECRET_ENV, option="--backend-secret-file"
        )
    except (OSError, ValueError) as e:
        raise usage.UsageError(f"cannot read the backend secret: {e}") from None


def origins_text(config: usage.Options) -> str | None:
    """The allowed origins as one comma-separated text: from the file if one is given."""
    path = config["allowed-origins-file"]
    if not path:
        return config["allowed-origins"]
    with open(path, encoding="utf-8") as f:
        entries = [e.strip() for line in f for e in line.split(",") if e.strip()]
    if not entries:
        raise ValueError(f"--allowed-origins-file {path} is empty")
    return ",".join(entries)


def load_settings(config: usage.Options) -> Settings:
    """Read the secret files and origins as the options say (at start and on SIGHUP).

    Secrets from environment variables cannot change while the process runs.
    Raises OSError or ValueError, naming the file, for anything unusable.
    """
    text = origins_text(config)
    return Settings(
        secret=load_secret(config["secret-file"], SECRET_ENV, min_bytes=MIN_KEY_BYTES),
        backend_secret=load_secret(
            config["backend-secret-file"], BACKEND_SECRET_ENV, option="--backend-secret-file"
        ),
        api_key=load_secret(config["api-key-file"], API_KEY_ENV, option="--api-key-file"),
        origins=OriginPolicy.parse(text),
        origins_text=text,
    )


def _named(name: str, kind: type) -> Any:
    """A coerce function whose error names the option and the value."""

    def coerce(value: str) -> Any:
        try:
            return kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"--{name} {value!r}: not {what}") from None

    coerce.coerceDoc = ""  # type: ignore[attr-defined]
    return coerce


def _with_named_coerce(parameters: list[list[Any]]) -> list[list[Any]]:
    return [p[:4] + [_named(p[0], p[4])] if len(p) > 4 else p for p in parameters]


class PushOptions(usage.Options):
    """``twistd push``'s options, raising UsageError like any usage.Options."""

    synopsis = "[options]"
    longdesc = (
        "Run the pushsvc WebSocket push service. Browsers connect to --ws-port and send "
        "their uid (or a signed token); backends write JSON lines to --text-port. "
        "Ports take a number or a Twisted endpoint description "
        "(tcp:1234:interface=0.0.0.0, ssl:..., unix:..., systemd:...)."
    )
    optParameters = [
        ["ws-port", None, "1234", "WebSocket port or endpoint (all interfaces)."],
        ["text-port", None, "5678", "Backend port or endpoint (127.0.0.1 only by default)."],
        [
            "http-port",
            None,
            "8080",
            "HTTP port or endpoint for the API, /healthz, /metrics and the browser side "
            "(/ws, /push.js, /demo) "
            "(127.0.0.1 only by default; 'off' to disable).",
        ],
        [
            "secret-file",
            None,
            None,
            f"File holding the HS256 JWT secret (or set ${SECRET_ENV}). "
            "Without one, the first frame is trusted as the uid.",
        ],
        [
            "api-key-file",
            None,
            None,
            f"File holding the key the HTTP API requires (or set ${API_KEY_ENV}).",
        ],
        [
            "metrics-port",
            None,
            "off",
            "Port or endpoint of this process's own /metrics and /healthz, never shared "
            "(127.0.0.1 only by default; with --reuse-port a scrape of the shared "
            "--http-port reaches a random process).",
        ],
        ["auth-timeout", None, 10.0, "Seconds a connection may take to authenticate.", float],
        ["max-line", None, 1 << 20, "Longest backend request line, in bytes.", int],
        ["max-body", None, 1 << 20, "Largest HTTP API request body, in bytes.", int],
        ["max-client-frame", None, 4096, "Largest frame a browser may send, in bytes.", int],
        ["ping-interval", None, 30.0, "Seconds between WebSocket pings (0: off).", float],
        ["ping-timeout", None, 10.0, "Seconds to wait for a pong before dropping.", float],
        [
            "redis-timeout",
            None,
            1.0,
            "Seconds Redis may send nothing while requests wait before it counts as unreachable.",
            float,
        ],
        [
            "cluster-heartbeat",
            None,
            2.0,
            "Seconds between this node's presence records in Redis (they expire after 3).",
            float,
        ],
        ["drain-timeout", None, 5.0, "Seconds shutdown waits for clients to close.", float],
        [
            "history-ttl",
            None,
            0,
            "Seconds a push is kept for clients that reconnect, when it gives no ttl "
            f"(0: only pushes with a ttl are kept; at most {MAX_TTL}).",
            int,
        ],
        [
            "history-size",
            None,
            DEFAULT_SIZE,
            "Messages kept per uid or group for clients that reconnect.",
            int,
        ],
        *LIMIT_PARAMETERS,
        [
            "trim-interval",
            None,
            60.0,
            "Seconds between handing freed memory back to the OS (glibc malloc_trim; 0: never).",
            float,
        ],
        [
            "gc-interval",
            None,
            60.0,
            "Seconds between full garbage collections (0: CPython's own schedule, which "
            "makes each new connection cost more the more are held).",
            float,
        ],
        ["log-level", None, "info", "Log level for Autobahn's own messages (debug is per frame)."],
    ]
    optParameters = _with_named_coerce(optParameters)
    optFlags = [
        ["compression", None, "Accept permessage-deflate (off by default: it costs CPU and RAM)."],
        [
            "reuse-port",
            None,
            "Open the WebSocket, backend and HTTP ports with SO_REUSEPORT (Linux): several "
            "processes share them and the kernel spreads connections (give them one --redis).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["redis"] = []

    def opt_redis(self, url: str) -> None:
        """Redis URL (redis://, rediss://, unix://, redis+sentinel://): this node joins a cluster.

        Repeat for several Redis servers: uids are spread over them by a consistent hash.
        """
        self["redis"].append(url)

    def postOptions(self) -> None:
        shared = self["reuse-port"]
        check_endpoint("ws-port", self["ws-port"], reuse_port=shared)
        check_endpoint("text-port", self["text-port"], LOCAL, reuse_port=shared)
        if self["http-port"] != "off":
            check_endpoint("http-port", self["http-port"], LOCAL, reuse_port=shared)
        if self["metrics-port"] != "off":
            check_endpoint("metrics-port", self["metrics-port"], LOCAL)
        for url in self["redis"]:
            try:
                parse_redis_url(url)
            except ValueError as e:
                raise usage.UsageError(f"--redis {url!r}: {e}") from None
        for name in (
            "auth-timeout",
            "max-line",
            "max-body",
            "max-client-frame",
            "drain-timeout",
            "max-handshake",
            "handshake-timeout",
        ):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} {self[name]!r}: must be positive")
        for name in ("ping-interval", "ping-timeout"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} {self[name]!r}: must not be negative")
        if not 0 <= self["history-ttl"] <= MAX_TTL:
            raise usage.UsageError(
                f"--history-ttl {self['history-ttl']}: must be from 0 to {MAX_TTL}"
            )
        if not 1 <= self["history-size"] <= 100000:
            raise usage.UsageError(
                f"--history-size {self['history-size']}: must be from 1 to 100000"
            )
        if self["log-level"] not in log_levels:
            raise usage.UsageError(
                f"--log-level {self['log-level']!r}: must be one of {', '.join(log_levels)}"
            )
        try:
            self["secret"] = load_secret(self["secret-file"], SECRET_ENV, min_bytes=MIN_KEY_BYTES)
            self["api-key"] = load_secret(
                self["api-key-file"], API_KEY_ENV, option="--api-key-file"
            )
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"cannot read a secret: {e}") from None
        check_limit_options(self)


class Options(PushOptions):
    """The options as twistd uses them: a bad value is one line on stderr and exit status 1."""

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse, and say what is wrong in one line: no traceback, no help text before it.

        twistd prints the whole help before a UsageError; a bad value deserves
        the option, the value and the reason, on stderr, with a non-zero exit.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            reason = str(e).removeprefix("Parameter type enforcement failed: ")
            raise SystemExit(
                f"twistd push: {reason} (twistd push --help lists the options)"
            ) from None


def makeService(config: PushOptions) -> service.MultiService:
    """The service tree: the node first, so it stops last, after the drain."""
    # Autobahn logs every frame at debug level through txaio; keep that off
    # the hot path unless asked for.
    txaio.set_global_log_level(config["log-level"])
    if config["log-level"] != "debug":
        quiet_autobahn_debug()
    top = service.MultiService()
    settings = Reloadable(lambda: load_settings(config))
    ReloadOnHangup(settings).setServiceParent(top)
    node = make_node(config)
    node.setServiceParent(top)
    node.store.setServiceParent(top)
    Drain(node.hub, config["drain-window"], config["drain-timeout"]).setServiceParent(top)
    if config["trim-interval"] > 0:
        trimmer(config["trim-interval"]).setServiceParent(top)
    listen(top, config, node, settings)
    if config["gc-interval"] > 0:  # last: it freezes what start-up built
        full_collections(config["gc-interval"]).setServiceParent(top)
    log_policy(config)
    return top


def listen(
    top: service.MultiService, config: PushOptions, node: Node, settings: Reloadable
) -> None:
    """Every port: the WebSocket, backend, HTTP and metrics listeners, each by its role."""

    def add(role: str, option: str, interface: str | None, factory: Any, shared: bool) -> None:
        Listener(role, option, config[option], interface, factory, shared).setServiceParent(top)

    shared = config["reuse-port"]
    ws_factory = make_ws_factory(config, node, settings)
    add("WebSocket", "ws-port", None, ws_factory, shared)
    throttle = FailureThrottle(limit=config["auth-fail-limit"])
    backend = BackendFactory(
        node,
        config["max-line"],
        BackendGate(settings.backend_secret, throttle),
        auth_timeout=config["auth-timeout"],
        max_backends=config["max-backends"] or default_max_backends(),
        max_pending=config["max-backend-pending"],
    )
    add("backend", "text-port", LOCAL, backend, shared)
    if config["http-port"] != "off":
        # /ws on the HTTP port shares the --ws-port factory; no port starts it
        # for the resource, so a service does.
        FactoryService(ws_factory).setServiceParent(top)
        site = make_site(node, settings.api_key, config["max-body"], ws_factory, throttle)
        add("HTTP", "http-port", LOCAL, site, shared)
    if config["metrics-port"] != "off":
        add("metrics", "metrics-port", LOCAL, make_metrics_site(node), False)


def make_node(config: PushOptions) -> Node:
    """A node with the memory broker and store, or Redis ones with ``--redis``."""
    if config["redis"]:
        from pushsvc.broker.redis import RedisBroker
        from pushsvc.history.store import RedisStore

        broker = RedisBroker(
            config["redis"], timeout=config["redis-timeout"], heartbeat=config["cluster-heartbeat"]
        )
        store: MemoryStore | RedisStore = RedisStore(broker.call, size=config["history-size"])
        log.info("cluster member through Redis {urls}", urls=", ".join(config["redis"]))
        return Node(broker, store, default_ttl=config["history-ttl"])
    store = MemoryStore(size=config["history-size"])
    return Node(MemoryBroker(), store, default_ttl=config["history-ttl"])


def make_ws_factory(config: PushOptions, node: Node, settings: Reloadable) -> PushServerFactory:
    """The WebSocket factory; its authenticator and origin policy follow SIGHUP's reloads."""
    return PushServerFactory(
        node,
        settings,  # type: ignore[arg-type]  # authenticate() and signed, as an authenticator
        auth_timeout=config["auth-timeout"],
        max_frame=config["max-client-frame"],
        ping_interval=config["ping-interval"],
        ping_timeout=config["ping-timeout"],
        compression=config["compression"],
        max_queue=config["max-queue"],
        max_connections=config["max-connections"] or default_max_connections(),
        max_per_uid=config["max-per-uid"],
        max_per_ip=config["max-per-ip"],
        client_rate=config["client-rate"],
        client_burst=config["client-burst"],
        allowed_origins=settings,  # type: ignore[arg-type]  # allows(), as an OriginPolicy
        trust_x_forwarded_for=config["trust-x-forwarded-for"],
        max_handshake=config["max-handshake"],
        handshake_timeout=config["handshake-timeout"],
    )


def log_policy(config: PushOptions) -> None:
    """Say at start-up who may connect and push."""
    if config["secret"]:
        log.info(
            "WebSocket clients must present an HS256 token signed with {keys}",
            keys=config["secret"].describe(),
        )
    else:
        log.warn(
            "WebSocket connections are UNAUTHENTICATED: the first frame is taken as the uid. "
            "Set --secret-file or ${env} to require signed tokens.",
            env=SECRET_ENV,
        )
    if config["backend-secret"] is not None:
        log.info("backend connections must authenticate with the backend secret first")
    if config["http-port"] != "off" and config["api-key"] is None:
        log.info("the HTTP API accepts requests without an API key")
