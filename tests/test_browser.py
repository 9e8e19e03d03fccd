"""push.js and the demo page in headless Chromium, against real ``twistd push`` processes.

Debian's /usr/bin/chromium driven by Playwright (never a downloaded browser).
Without it the module is skipped, except in CI (``CI`` set), where a missing
browser is a failure.  ``PUSHSVC_SCREENSHOT=1`` rewrites docs/demo.png.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip(
        f"{CHROMIUM} is missing (apt-get install chromium); in CI this is an error",
        allow_module_level=True,
    )

from conftest import ROOT, PushServer, child_env  # noqa: E402
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright  # noqa: E402
from test_auth import SECRET, token  # noqa: E402

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FAST = {"backoffBase": "50", "backoffCap": "400"}  # reconnects in tests take milliseconds
SCREENSHOT = ROOT / "docs" / "demo.png"
VIEWPORT = {"width": 760, "height": 640}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(10_000)
    expect.set_options(timeout=10_000)
    yield context
    context.close()


def sockets(page: Page) -> list[str]:
    """Every WebSocket the page opens (attempts, not only successes), by URL."""
    opened: list[str] = []
    page.on("websocket", lambda ws: opened.append(ws.url))
    return opened


def open_demo(context: BrowserContext, server: PushServer, **query: str) -> tuple[Page, list[str]]:
    page = context.new_page()
    attempts = sockets(page)
    page.goto(f"{server.http_url}/demo?" + "&".join(f"{k}={v}" for k, v in query.items()))
    return page, attempts


def blank_page(context: BrowserContext, server: PushServer) -> tuple[Page, list[str]]:
    """A page of the server's own origin, with push.js loaded and nothing else running.

    /healthz is that page: a real response from 127.0.0.1 (a page the test
    fulfilled itself would count as public, and Chromium's local network
    access checks would then block its WebSockets to 127.0.0.1).
    """
    page = context.new_page()
    attempts = sockets(page)
    page.goto(f"{server.http_url}/healthz")
    page.add_script_tag(url="/push.js")
    return page, attempts


def settle(page: Page, attempts: list[str], server: PushServer) -> None:
    """Fire every timer due within the next minute, then collect every WebSocket opened so far.

    Needs the page's clock installed (``context.clock.install()`` before the
    page loads): a retry push.js scheduled fires now instead of after a sleep.
    A marker WebSocket opened afterwards is reported after every earlier one
    (Playwright reports a page's WebSockets in order); it is removed again.
    """
    page.clock.run_for(60_000)
    marker = f"ws://127.0.0.1:{server.ws_port}/?settled-{time.monotonic_ns()}"
    page.evaluate("(url) => new WebSocket(url).close()", marker)
    deadline = time.monotonic() + 10
    while marker not in attempts:
        assert time.monotonic() < deadline, "the marker WebSocket was not reported"
        page.wait_for_timeout(10)
    attempts.remove(marker)


def wait_online(server: PushServer, uid: str) -> None:
    """Until ``uid`` is online: the page's first frame has reached the service."""
    with server.backend() as b:
        deadline = time.monotonic() + 10
        while not b.json(f'{{"cmd":"online","uid":"{uid}"}}')["online"][uid]:
            assert time.monotonic() < deadline, f"{uid} did not come online"
            time.sleep(0.02)


def push(server: PushServer, uid: str, data: str) -> bytes:
    with server.backend() as b:
        return b.request(f'{{"uid":"{uid}","data":"{data}"}}')


def log_messages(page: Page) -> list[str]:
    return page.locator("#log li.msg span").all_inner_texts()


def run_demo(server: PushServer, uid: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pushsvc.demo", "--uid", uid, "--port", str(server.text_port)]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=30, cwd=ROOT, env=child_env()
    )


def test_demo_shows_progress_from_the_demo_script(context: BrowserContext, server) -> None:
    page, attempts = open_demo(context, server, uid="uid1")
    expect(page.locator("#state")).to_have_text("open")
    wait_online(server, "uid1")
    proc = run_demo(server, "uid1", "--delay", "0.05")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [f"{p}%" for p in range(0, 101, 10)]
    assert proc.stdout.split()[::2] == steps
    expect(page.locator("#percent")).to_have_text("100%")
    expect(page.locator("#bar")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#log li.msg span")).to_have_count(len(steps))
    assert log_messages(page) == steps
    # The page's default WebSocket URL is /ws on the HTTP port it came from.
    assert attempts == [f"ws://127.0.0.1:{server.http_port}/ws"]
    if os.environ.get("PUSHSVC_SCREENSHOT") == "1":
        # Once the bar's CSS transition has finished.
        page.wait_for_function(
            "(f => f.offsetWidth === f.parentNode.clientWidth)(document.getElementById('fill'))"
        )
        page.screenshot(path=SCREENSHOT, full_page=True)


def test_demo_understands_json_percentages(context: BrowserContext, server) -> None:
    page, _ = open_demo(context, server, uid="demo-json")
    expect(page.locator("#state")).to_have_text("open")
    wait_online(server, "demo-json")
    with server.backend() as b:
        assert b.request('{"uid":"demo-json","data":{"task":7,"percent":88}}') == b"ok"
    expect(page.locator("#percent")).to_have_text("88%")
    assert log_messages(page) == ['{"task":7,"percent":88}']


def test_demo_on_the_ws_port(context: BrowserContext, server) -> None:
    ws_url = f"ws://127.0.0.1:{server.ws_port}/"
    page, attempts = open_demo(context, server, uid="demo-wsport", ws=ws_url)
    expect(page.locator("#state")).to_have_text("open")
    wait_online(server, "demo-wsport")
    assert push(server, "demo-wsport", "40%") == b"ok"
    expect(page.locator("#percent")).to_have_text("40%")
    assert attempts == [ws_url]


def test_two_tabs_of_one_uid_both_update(context: BrowserContext, server) -> None:
    tabs = [open_demo(context, server, uid="tabs")[0] for _ in range(2)]
    for tab in tabs:
        expect(tab.locator("#state")).to_have_text("open")
    server.push_until_delivered("tabs", "60%", connections=2)
    for tab in tabs:
        expect(tab.locator("#percent")).to_have_text("60%")


def test_page_reconnects_after_a_restart(context: BrowserContext, start_server) -> None:
    first: PushServer = start_server()
    page, attempts = open_demo(context, first, uid="restart", **FAST)
    expect(page.locator("#state")).to_have_text("open")
    wait_online(first, "restart")
    assert push(first, "restart", "30%") == b"ok"
    expect(page.locator("#percent")).to_have_text("30%")

    first.stop(signal.SIGTERM)
    expect(page.locator("#state")).to_have_text("reconnecting")
    same_ports = [
        f"--{name}=tcp:{port}:interface=127.0.0.1"
        for name, port in [
            ("ws-port", first.ws_port),
            ("text-port", first.text_port),
            ("http-port", first.http_port),
        ]
    ]
    second: PushServer = start_server(*same_ports)
    assert second.http_port == first.http_port
    expect(page.locator("#state")).to_have_text("open")
    wait_online(second, "restart")
    assert push(second, "restart", "70%") == b"ok"
    expect(page.locator("#percent")).to_have_text("70%")
    assert log_messages(page) == ["30%", "70%"]
    assert page.locator("#log li.event", has_text="closed 1001").count() == 1
    assert len(attempts) >= 2


def test_tokens_good_and_bad(context: BrowserContext, start_server) -> None:
    server: PushServer = start_server(env={"PUSHSVC_SECRET": SECRET})
    context.clock.install()
    good, _ = open_demo(context, server, uid="tok", token=token("tok"), **FAST)
    expect(good.locator("#state")).to_have_text("open")
    wait_online(server, "tok")
    assert push(server, "tok", "90%") == b"ok"
    expect(good.locator("#percent")).to_have_text("90%")

    bad, attempts = open_demo(context, server, token=token("tok", secret="x" * 32), **FAST)
    expect(bad.locator("#state")).to_have_text("failed")
    expect(bad.locator("#log li.error")).to_contain_text("authentication failed (4001)")
    settle(bad, attempts, server)  # a retry loop would have made many attempts in a minute
    assert len(attempts) == 1
    expect(bad.locator("#state")).to_have_text("failed")
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=5) as resp:
        assert 'pushsvc_auth_failures_total{code="4001"} 1.0' in resp.read().decode()


def test_get_token_refreshes_an_expired_token(context: BrowserContext, start_server) -> None:
    server: PushServer = start_server(env={"PUSHSVC_SECRET": SECRET})
    context.clock.install()
    page, attempts = blank_page(context, server)
    tokens = [token("fresh", exp_in=-10), token("fresh")]  # expired first, then valid
    page.evaluate(
        """([url, tokens]) => {
            window.calls = 0;
            window.events = [];
            const client = new PushClient(url, {
                getToken: async () => tokens[window.calls++], backoffBase: 50, backoffCap: 400});
            client.on('authfailure', (d) => events.push('authfailure ' + d.code));
            client.on('close', (d) => events.push('close ' + d.code + ' ' + d.reconnect));
            client.on('message', (d) => events.push('message ' + d.data));
            window.client = client.connect();
        }""",
        [f"ws://127.0.0.1:{server.http_port}/ws", tokens],
    )
    page.wait_for_function("client.state === 'open' && calls === 2")
    wait_online(server, "fresh")
    assert push(server, "fresh", "hello") == b"ok"
    page.wait_for_function("events.length === 2")
    assert page.evaluate("events") == ["close 4002 true", "message hello"]
    assert len(attempts) == 2

    # A token the server calls invalid (4001) is final even with getToken.
    page.evaluate(
        """(url) => {
            window.badCalls = 0;
            window.bad = new PushClient(url, {
                getToken: async () => { badCalls++; return 'not-a-token'; }, backoffBase: 50});
            bad.on('authfailure', (d) => { window.failedWith = d.code; });
            bad.connect();
        }""",
        f"ws://127.0.0.1:{server.http_port}/ws?bad",
    )
    page.wait_for_function("bad.state === 'failed'")
    page.clock.run_for(60_000)  # a retry would call getToken again (synchronously, first thing)
    assert page.evaluate("[badCalls, failedWith, bad.state]") == [1, 4001, "failed"]


# (close code, state it ends in, reconnects?) for codes the backend's disconnect can send.
LIVE_CODES = [
    (4009, "closed", False),  # the backend's disconnect default: logout, ban
    (4150, "closed", False),  # an application-chosen code
    (1000, "closed", False),
    (4000, "failed", False),
    (4002, "failed", False),  # expired, and no getToken to get another: auth failure
    (4008, "open", True),
    (4010, "open", True),
    (4029, "open", True),
    (3000, "open", True),
]


def test_close_codes_from_the_server(context: BrowserContext, server) -> None:
    context.clock.install()
    page, attempts = blank_page(context, server)
    url = f"ws://127.0.0.1:{server.ws_port}/"
    for code, _, _ in LIVE_CODES:
        uid = f"code-{code}"
        page.evaluate(
            """([url, uid]) => {
                const c = new PushClient(url, {uid, backoffBase: 50, backoffCap: 400});
                c.authfailures = 0;
                c.on('authfailure', () => c.authfailures++);
                (window.clients ||= {})[uid] = c.connect();
            }""",
            [f"{url}?{uid}", uid],
        )
        wait_online(server, uid)
    with server.backend() as b:
        for code, _, _ in LIVE_CODES:
            assert (
                b.json(f'{{"cmd":"disconnect","uid":"code-{code}","code":{code}}}')["closed"] == 1
            )
    for code, state, reconnects in LIVE_CODES:
        client, connections = f"clients['code-{code}']", 2 if reconnects else 1
        page.wait_for_function(
            f"{client}.state === '{state}' && {client}.connections === {connections}"
        )
    settle(page, attempts, server)  # a minute's retries, at once
    for code, state, reconnects in LIVE_CODES:
        uid = f"code-{code}"
        assert page.evaluate(f"clients['{uid}'].state") == state, code
        tries = sum(1 for a in attempts if a.endswith(f"?{uid}"))
        assert tries == (2 if reconnects else 1), (code, tries)
        failures = page.evaluate(f"clients['{uid}'].authfailures")
        assert failures == (1 if code == 4002 else 0), code


def test_close_code_table(context: BrowserContext, server) -> None:
    """push.js's reaction to every close code docs/browser.md lists."""
    page, _ = blank_page(context, server)
    table = {
        "final": [1000, 1002, 1003, 1007, 1008, 1009, 4000, 4009, 4100, 4500, 4999],
        "auth": [4001],
        "reconnect": [1001, 1005, 1006, 1011, 1012, 1013, 3000, 4003, 4008, 4010, 4029, 4099],
    }
    got = page.evaluate(
        "(codes) => codes.map((c) => [false, true].map((g) => PushClient.reaction(c, g)))",
        [c for codes in table.values() for c in codes] + [4002],
    )
    expected = (
        [
            ["closed", "closed"] if c in (1000, 4009) or c >= 4100 else ["failed", "failed"]
            for c in table["final"]
        ]
        + [["authfailure", "authfailure"]]
        + [["reconnect", "reconnect"]] * len(table["reconnect"])
        + [["authfailure", "refresh"]]
    )
    assert got == expected


def test_oversized_uid_is_final(context: BrowserContext, server) -> None:
    """A credential larger than --max-client-frame gets 1009: retrying cannot help."""
    context.clock.install()
    page, attempts = blank_page(context, server)
    page.evaluate(
        """(url) => { window.big = new PushClient(url, {uid: 'x'.repeat(5000), backoffBase: 50});
                      big.connect(); }""",
        f"ws://127.0.0.1:{server.http_port}/ws",
    )
    page.wait_for_function("big.state === 'failed'")
    settle(page, attempts, server)
    assert len(attempts) == 1 and page.evaluate("big.state") == "failed"


def test_close_from_the_app_does_not_reconnect(context: BrowserContext, server) -> None:
    context.clock.install()
    page, attempts = blank_page(context, server)
    page.evaluate(
        """(url) => { window.c = new PushClient(url, {uid: 'app-close', backoffBase: 50});
                      c.connect(); }""",
        f"ws://127.0.0.1:{server.http_port}/ws",
    )
    page.wait_for_function("c.state === 'open'")
    wait_online(server, "app-close")
    page.evaluate("c.close()")
    settle(page, attempts, server)
    assert page.evaluate("c.state") == "closed" and len(attempts) == 1
    with server.backend() as b:
        assert b.json('{"cmd":"online","uid":"app-close"}')["online"]["app-close"] is False
    page.evaluate("c.connect()")  # and connect() starts again
    page.wait_for_function("c.state === 'open'")
    assert len(attempts) == 2


def test_online_event_skips_the_backoff(context: BrowserContext, server) -> None:
    page, attempts = blank_page(context, server)
    page.evaluate(
        """(url) => {
            Math.random = () => 0.99;  // the full-jitter delay is then ~the whole minute
            window.c = new PushClient(url, {uid: 'online-ev', backoffBase: 6e4, backoffCap: 6e4});
            c.connect();
        }""",
        f"ws://127.0.0.1:{server.http_port}/ws",
    )
    page.wait_for_function("c.state === 'open'")
    wait_online(server, "online-ev")
    with server.backend() as b:
        b.json('{"cmd":"disconnect","uid":"online-ev","code":4010}')
    page.wait_for_function("c.state === 'reconnecting'")
    page.evaluate("window.dispatchEvent(new Event('online'))")
    page.wait_for_function("c.state === 'open'", timeout=3000)
    assert len(attempts) == 2


def test_a_connection_that_lived_through_an_outage_is_replaced(
    context: BrowserContext, server
) -> None:
    """offline, then online: the old socket is probably dead, so open a new one at once."""
    page, attempts = blank_page(context, server)
    page.evaluate(
        """(url) => { window.c = new PushClient(url, {uid: 'outage', backoffBase: 50});
                      c.on('state', ({state}) => (window.states ||= []).push(state));
                      c.on('message', ({data}) => { window.got = data; });
                      c.connect(); }""",
        f"ws://127.0.0.1:{server.http_port}/ws",
    )
    page.wait_for_function("c.state === 'open'")
    context.set_offline(True)
    page.wait_for_function("navigator.onLine === false")
    context.set_offline(False)
    page.wait_for_function("c.state === 'open' && c.connections === 2")
    assert page.evaluate("states") == ["connecting", "open", "connecting", "open"]
    assert len(attempts) == 2
    with server.backend() as b:  # the replaced connection is gone from the service too
        deadline = time.monotonic() + 5
        while b.json('{"id":1,"uid":"outage","data":"back"}')["delivered"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    page.wait_for_function("window.got === 'back'")


def test_a_hanging_handshake_is_retried(context: BrowserContext, server) -> None:
    """A server that accepts TCP but never answers the upgrade: time out and try again."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    page, attempts = blank_page(context, server)
    page.evaluate(
        """(url) => { window.c = new PushClient(url, {uid: 'hang', connectTimeout: 200,
                                                      backoffBase: 20, backoffCap: 50});
                      c.connect(); }""",
        f"ws://127.0.0.1:{listener.getsockname()[1]}/",
    )
    page.wait_for_function("c.attempt >= 3")
    assert page.evaluate("c.state") in ("connecting", "reconnecting") and len(attempts) >= 3
    listener.close()
    for conn in held:
        conn.close()


def test_push_mjs_is_an_es_module(context: BrowserContext, server) -> None:
    page = context.new_page()
    attempts = sockets(page)
    page.goto(f"{server.http_url}/healthz")
    page.add_script_tag(
        type="module",
        content="""
        import {PushClient} from '/push.mjs';
        import Default from '/push.mjs';
        window.sameClass = PushClient === Default;
        const c = new PushClient(new URL('/ws', location.href).href.replace(/^http/, 'ws'),
                                 {uid: 'esm'});
        c.on('message', ({data}) => { window.got = data; });
        window.c = c.connect();
        """,
    )
    page.wait_for_function("window.c && c.state === 'open'")
    assert page.evaluate("window.sameClass") is True
    wait_online(server, "esm")
    assert push(server, "esm", "from a module") == b"ok"
    page.wait_for_function("window.got === 'from a module'")
    assert attempts == [f"ws://127.0.0.1:{server.http_port}/ws"]


def test_screenshot_is_committed() -> None:
    """docs/demo.png is what the README shows: a page screenshot this module took.

    PUSHSVC_SCREENSHOT=1 regenerates it (a full-page screenshot: the context's
    viewport width, at least its height).
    """
    png = SCREENSHOT.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height >= VIEWPORT["height"]) == (VIEWPORT["width"], True)
    assert "](docs/demo.png)" in (ROOT / "README.md").read_text()


RECOVERING_CLIENT = """([url, uid]) => {
    window.log = JSON.parse(sessionStorage.getItem('log') || '[]');
    window.events = [];
    const c = new PushClient(url, {uid, persist: true, backoffBase: 50, backoffCap: 400});
    c.on('message', ({data, offset}) => {
        log.push([offset, data]);
        sessionStorage.setItem('log', JSON.stringify(log));
    });
    c.on('recovered', ({channel}) => events.push('recovered ' + channel));
    c.on('recoverfailed', ({channel}) => events.push('recoverfailed ' + channel));
    window.c = c.connect();
}"""


def test_a_reloaded_page_misses_nothing_and_sees_nothing_twice(
    context: BrowserContext, server
) -> None:
    """persist: positions survive a reload in sessionStorage, and the hello recovers the gap."""
    user, count = "reload-" + str(time.monotonic_ns()), 60
    page, _ = blank_page(context, server)
    url = f"ws://127.0.0.1:{server.http_port}/ws"
    page.evaluate(RECOVERING_CLIENT, [url, user])
    wait_online(server, user)
    done = threading.Event()

    def backend() -> None:
        with server.backend() as b:
            for i in range(1, count + 1):
                reply = b.request(f'{{"uid":"{user}","data":"m{i}","ttl":60}}')
                assert reply in (b"ok", b"queued"), reply
                time.sleep(0.02)
        done.set()

    thread = threading.Thread(target=backend, daemon=True)
    thread.start()
    for seen in (5, 25):  # reload twice mid-stream, once the page has positions
        page.wait_for_function(f"log.length >= {seen}")
        page.reload()
        page.add_script_tag(url="/push.js")
        page.evaluate(RECOVERING_CLIENT, [url, user])
    thread.join(10)
    assert done.is_set()
    # A plain push after the last stored one: a duplicate would come before it.
    server.push_until_delivered(user, "marker")
    page.wait_for_function("log.length && log[log.length - 1][1] === 'marker'")
    log = page.evaluate("log")
    assert log == [[i, f"m{i}"] for i in range(1, count + 1)] + [[None, "marker"]]
    assert page.evaluate("events") == [f"recovered u:{user}"]  # the last page's recovery
