"""Remote image fetches: only public addresses or allow-listed hosts, redirects re-checked, the checked address
connected to, one deadline, a size cap, and errors that say nothing about the internal network. The "remote" site is
a local HTTP server on 127.0.0.1, so it is fetched only when the operator allow-lists it."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlparse

import pytest

from healthgpt.errors import RemoteImageError
from healthgpt.serving.remote import RemotePolicy, client, fetch_remote, is_public

IMAGE = bytes(range(256)) * 4


class _Site(http.server.BaseHTTPRequestHandler):
    """/image, /big, /slow (a byte every 0.2 s), /redirect?to=URL; records each request's path and Host header."""

    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append((self.path, self.headers.get("Host", "")))
        url = urlparse(self.path)
        if url.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", parse_qs(url.query)["to"][0])
            self.end_headers()
            return
        if url.path not in ("/image", "/big", "/slow"):
            self.send_error(404)
            return
        body = bytes(5000) if url.path == "/big" else IMAGE
        self.send_response(200)
        if url.path != "/big":  # /big declares no length (HTTP/1.0: the body ends when the connection closes)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for start in range(0, len(body), 1 if url.path == "/slow" else len(body)):
                self.wfile.write(body[start : start + (1 if url.path == "/slow" else len(body))])
                self.wfile.flush()
                if url.path == "/slow":
                    time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _fetch(url: str, **policy: object) -> bytes:
    async def run() -> bytes:
        async with client() as http:
            return await fetch_remote(url, http, RemotePolicy(**policy), "image 1")

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.10", False),
        ("169.254.169.254", False),  # cloud metadata (link-local)
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.251", False),  # multicast
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),  # loopback dressed as IPv6
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_only_public_addresses_count_as_public(address: str, public: bool) -> None:
    assert is_public(address) is public


def test_loopback_is_refused_unless_allow_listed_and_the_refusal_reveals_nothing(site: str) -> None:
    _Site.seen.clear()
    for url in (f"http://{site}/image", f"http://localhost:{site.split(':')[1]}/image", f"http://{site}/missing"):
        with pytest.raises(RemoteImageError) as refused:
            _fetch(url)
        assert str(refused.value) == (
            "image 1: this server does not fetch images from that host (unknown, not public, or not allow-listed); "
            "send the image inline as a data: URI"
        )
    with pytest.raises(RemoteImageError, match="does not fetch images from that host") as unknown:
        _fetch("http://no-such-host.invalid/image")
    assert str(unknown.value) == str(refused.value)  # an unknown host reads like a private one
    with pytest.raises(RemoteImageError, match="does not fetch images from that host"):
        _fetch(f"http://{site}/image", hosts=frozenset({"example.org"}))  # a list, without this host
    assert _Site.seen == []  # nothing reached the local server


def test_an_allow_listed_host_is_fetched_from_the_checked_address_with_its_own_host_header(site: str) -> None:
    _Site.seen.clear()
    port = site.split(":")[1]
    assert _fetch(f"http://{site}/image", hosts=frozenset({"127.0.0.1"})) == IMAGE
    assert _fetch(f"http://localhost:{port}/image", hosts=frozenset({"localhost"})) == IMAGE
    assert _Site.seen == [("/image", site), ("/image", f"localhost:{port}")]


def test_redirects_are_checked_again(site: str) -> None:
    _Site.seen.clear()
    port = site.split(":")[1]
    listed = frozenset({"127.0.0.1"})
    assert _fetch(f"http://{site}/redirect?to=/image", hosts=listed) == IMAGE  # same host: followed
    with pytest.raises(RemoteImageError, match="does not fetch images from that host"):
        _fetch(f"http://{site}/redirect?to=http://localhost:{port}/image", hosts=listed)
    with pytest.raises(RemoteImageError, match="redirects more than 1 times"):
        _fetch(f"http://{site}/redirect?to=/redirect%3Fto%3D/image", hosts=listed, max_redirects=1)
    assert [path for path, _ in _Site.seen].count("/image") == 1


def test_deadline_size_cap_and_status_are_clear(site: str) -> None:
    listed = frozenset({"127.0.0.1"})
    with pytest.raises(RemoteImageError, match=r"did not deliver the image within 0.5 s"):
        _fetch(f"http://{site}/slow", hosts=listed, deadline=0.5)  # 1024 bytes at 5 a second: one deadline ends it
    with pytest.raises(RemoteImageError, match="larger than the server's limit of 4000 bytes"):
        _fetch(f"http://{site}/big", hosts=listed, max_bytes=4000)
    with pytest.raises(RemoteImageError, match="answered HTTP 404"):
        _fetch(f"http://{site}/missing", hosts=listed)
    with pytest.raises(RemoteImageError, match="could not be fetched"):
        _fetch("http://127.0.0.1:1/image", hosts=listed)  # nothing listens: no port-scan detail in the message


def test_the_connection_goes_to_the_checked_address_not_to_a_second_lookup(
    site: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebinding DNS server answers the check with one address and the connection with another; here the name
    resolves once (to the local site) and any second lookup would fail, so the fetch succeeding shows there is none."""
    lookups: list[str] = []
    real = socket.getaddrinfo

    def rebinding(host: str, *args: object, **kwargs: object) -> list:
        if host == "images.rebind.test":
            lookups.append(host)
            if len(lookups) > 1:
                raise socket.gaierror("second lookup")
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    _Site.seen.clear()
    port = site.split(":")[1]
    url = f"http://images.rebind.test:{port}/image"
    assert _fetch(url, hosts=frozenset({"images.rebind.test"})) == IMAGE
    assert lookups == ["images.rebind.test"] and _Site.seen == [("/image", f"images.rebind.test:{port}")]
