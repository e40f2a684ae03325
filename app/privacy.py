"""Reducing personal data before it is stored, logged or shown."""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress

from flask import current_app, request

# A /24 (IPv4) or /48 (IPv6) names a network, not a subscriber.
IPV4_KEPT_PREFIX = 24
IPV6_KEPT_PREFIX = 48
# What one IPv6 subscriber is usually given.
IPV6_SUBSCRIBER_PREFIX = 64


# Every request asks this of its client address, and clients repeat: parse each address once.
@functools.lru_cache(maxsize=4096)
# Clients repeat: each address is reduced once per process.
@functools.lru_cache(maxsize=4096)
def truncate_ip(address: str | None) -> str | None:
    """The network part of an IP address, or None if it is not one."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = IPV4_KEPT_PREFIX if ip.version == 4 else IPV6_KEPT_PREFIX
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


def mask_email(email: str | None) -> str | None:
    """``jane.doe@example.com`` becomes ``j***@e***.com``."""
    if not email or "@" not in email:
        return None
    local, _, domain = email.rpartition("@")
    host, dot, tld = domain.rpartition(".")
    if not dot:
        host, tld = domain, ""
    return f"{local[:1]}***@{host[:1]}***{dot}{tld}"


def keyed_hash(purpose: str, value: str) -> str:
    """An HMAC-SHA256 of ``value`` keyed with SECRET_KEY, hex.

    Kept in place of personal data that only needs comparing (codes, addresses, file names):
    without the key, hashing a list of likely values recovers nothing.
    """
    key = current_app.config["SECRET_KEY"].encode()
    return hmac.digest(key, f"{purpose}:{value}".encode(), "sha256").hex()


def client_key() -> str:
    """Who is asking, as rate limits count it: one IPv4 address, or one IPv6 /64.

    An IPv6 subscriber is handed a whole /64 (or more), so a limit per IPv6 address would limit
    nothing. The key is a keyed hash, so no client address is kept in the counters' storage.
    """
    return _client_key(request.remote_addr, current_app.config["SECRET_KEY"])


# Clients repeat: each address is reduced and hashed once per process.
@functools.lru_cache(maxsize=4096)
def _client_key(address: str | None, secret_key: str) -> str:
    try:
        ip = ipaddress.ip_address((address or "").strip())
    except ValueError:
        subscriber = "unknown"
    else:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        subscriber = (
            str(ip)
            if ip.version == 4
            else str(ipaddress.ip_network(f"{ip}/{IPV6_SUBSCRIBER_PREFIX}", strict=False))
        )
    digest = hmac.new(secret_key.encode(), f"client:{subscriber}".encode(), hashlib.sha256)
    return digest.hexdigest()[:24]
