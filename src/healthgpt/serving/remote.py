"""Remote image URLs, fetched so that a request cannot reach the server's own network (SSRF).

The host is resolved here and every address it resolves to must be public (not loopback, private, link-local,
shared, reserved or multicast) unless the operator allow-listed the host; the connection then goes to the address
that was checked (no second lookup a rebinding DNS server could answer differently), with the original name in the
Host header and for TLS. Redirects are followed by hand and checked the same way. One deadline bounds the whole
fetch (a peer sending a byte a second cannot hold a request), and the body is capped. Errors say what the client can
fix and nothing about which internal hosts or ports exist. httpx has no hook for the address check, hence this.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import httpx

from ..errors import RemoteImageError


@dataclass(frozen=True)
class RemotePolicy:
    """What the server may fetch: `hosts` (lower-case names or addresses) are the only hosts allowed when given, and
    may then have private addresses (an internal PACS); without it any host whose addresses are all public."""

    hosts: frozenset[str] = frozenset()
    max_bytes: int = 32 * 2**20
    deadline: float = 10.0  # seconds for the whole fetch, redirects included
    max_redirects: int = 3


def is_public(address: str) -> bool:
    """True for an address on the public internet: not loopback, private, link-local, shared, reserved or
    multicast (IPv4-mapped IPv6 addresses are judged by their IPv4 address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone such as %eth0
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def client() -> httpx.AsyncClient:
    """The client fetches go through: no redirects of its own (each is checked here), no proxies from the
    environment (a proxy would connect to the name, not to the checked address)."""
    return httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=10.0)


async def fetch_remote(url: str, http: httpx.AsyncClient, policy: RemotePolicy, name: str) -> bytes:
    """The bytes at `url`, fetched under `policy`; `RemoteImageError` for anything refused or failed."""
    try:
        return await asyncio.wait_for(_fetch(url, http, policy, name), policy.deadline)
    except asyncio.TimeoutError:
        raise RemoteImageError(
            f"{name}: the image URL did not deliver the image within {policy.deadline:g} s; send it inline"
        ) from None


async def _fetch(url: str, http: httpx.AsyncClient, policy: RemotePolicy, name: str) -> bytes:
    for _ in range(policy.max_redirects + 1):
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL:
            raise RemoteImageError(f"{name}: not a valid http(s) URL") from None
        if target.scheme not in ("http", "https") or not target.host:
            raise RemoteImageError(f"{name}: only http(s) URLs with a host name can be fetched")
        address = await _checked_address(target, policy, name)
        request = http.build_request(
            "GET",
            target.copy_with(host=address),
            headers={"Host": target.netloc.decode("ascii")},
            extensions={"sni_hostname": target.host},
        )
        try:
            response = await http.send(request, stream=True)
        except httpx.HTTPError:
            raise RemoteImageError(f"{name}: the image URL could not be fetched") from None
        try:
            if response.is_redirect and "location" in response.headers:
                url = str(target.join(response.headers["location"]))
                continue
            if response.status_code != 200:
                raise RemoteImageError(f"{name}: the image URL answered HTTP {response.status_code}")
            return await _read_capped(response, policy.max_bytes, name)
        finally:
            await response.aclose()
    raise RemoteImageError(f"{name}: the image URL redirects more than {policy.max_redirects} times")


async def _checked_address(target: httpx.URL, policy: RemotePolicy, name: str) -> str:
    """The address to connect to: the host must be allow-listed (when a list is set) and, unless it is, resolve to
    public addresses only. Unknown, private and unlisted hosts get the same message."""
    host = target.host.lower()
    refused = RemoteImageError(
        f"{name}: this server does not fetch images from that host (unknown, not public, or not allow-listed); "
        "send the image inline as a data: URI"
    )
    listed = host in policy.hosts
    if policy.hosts and not listed:
        raise refused
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise refused from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses or (not listed and not all(map(is_public, addresses))):
        raise refused
    return addresses[0]


async def _read_capped(response: httpx.Response, max_bytes: int, name: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RemoteImageError(f"{name}: the image is larger than the server's limit of {max_bytes} bytes")
    data = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > max_bytes:
                raise RemoteImageError(f"{name}: the image is larger than the server's limit of {max_bytes} bytes")
    except httpx.HTTPError:
        raise RemoteImageError(f"{name}: the image URL could not be fetched") from None
    return bytes(data)
