"""Which URLs the backend will fetch: one strict parse that the HTTP client agrees with, and the host allow-list.

Why a parse of our own: the token check and the HTTP client must see the same host. ``urllib.parse`` and
urllib3 (what requests connects with) disagree on odd URLs: in ``http://other\\@label-studio/x.png`` the
first sees the host ``label-studio`` (``other\\`` is a user name) and the second connects to ``other``
(a backslash ends its authority). Such a URL would carry the Label Studio token to ``other``. So a URL is
accepted only when it is plain: http or https, no user information, a host of letters, digits, dots and
hyphens (or a dotted-quad IPv4 / bracketed IPv6 address), an optional numeric port, no control characters
anywhere — and only when both parsers then name the same scheme, host and port. Anything else is refused
with a message that says how to write it; nothing in Label Studio's own URLs needs more.

Why an allow-list (``SAM_IMAGE_HOSTS``): ``/predict`` and ``/webhook`` take task URLs from whoever can reach
the backend, which would otherwise make it fetch anything its network reaches (cloud metadata at
169.254.169.254, Redis, admin pages) and report which ports answer. ``HostPolicy`` says which hosts may be
fetched besides Label Studio's own origin (always allowed): ``public`` (any host whose every address is a
public one — what task URLs on the internet and presigned S3 / GCS / Azure URLs need), host names,
``*.domain`` suffixes and IP networks (a MinIO or file server inside your network), or ``*`` (anything).
The address check runs where the connection is made (``backend.http_download``), on the addresses it
connects to, so a name that resolves differently a moment later (DNS rebinding) cannot slip past it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

import urllib3.util

from backend.errors import ImageError

# Longer URLs are refused before anything else looks at them (a presigned URL is well under 4 KiB).
MAX_URL_CHARS = 8192
DEFAULT_PORTS = {"http": 80, "https": 443}
DEFAULT_IMAGE_HOSTS = "public"

_AUTHORITY = re.compile(r"(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_USERINFO = re.compile(r"(//)[^/?#]*@")

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeUrl(ImageError):
    """A URL the backend refuses to fetch because parsers could read it differently (422)."""


class Url(NamedTuple):
    """A URL that passed ``parse_url``: what the HTTP client will connect to."""

    scheme: str  # "http" | "https"
    host: str  # lower case; an IPv6 address without brackets
    port: int  # the default port filled in

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def ip(self) -> IP | None:
        """The host as an address when it is an IP literal, else None."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None


def shown(url: str) -> str:
    """The URL for a message: user information masked, cut short, printable."""
    text = _USERINFO.sub(r"\1***@", url[:200])
    return text.encode("unicode_escape").decode("ascii") + ("..." if len(url) > 200 else "")


def parse_url(url: str, what: str = "The image URL") -> Url:
    """``url``'s scheme, host and port, or ``UnsafeUrl`` naming what is wrong with it."""

    def refuse(reason: str) -> UnsafeUrl:
        return UnsafeUrl(f"{what} '{shown(url)}' is refused: {reason}. Write it as http(s)://host[:port]/path, "
                         "with the host in plain letters, digits, dots and hyphens (or an IP address).")

    if len(url) > MAX_URL_CHARS:
        raise refuse(f"it is longer than {MAX_URL_CHARS} characters")
    if _CONTROL.search(url):
        raise refuse("it contains control characters")
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)", url)
    if match is None:
        raise refuse("it does not start with http:// or https://")
    scheme, authority = match.group(1).lower(), match.group(2)
    if scheme not in DEFAULT_PORTS:
        raise refuse(f"the scheme '{scheme}' is not http or https")
    if "@" in authority:
        raise refuse("it has a user name or password before '@' (credentials do not belong in task URLs)")
    if "\\" in authority:
        raise refuse("it has a backslash in the host part")
    parts = _AUTHORITY.fullmatch(authority)
    if parts is None:
        raise refuse("its host part is not a plain host name or IP address with an optional numeric port")
    host = parts.group("host").lower()
    port = int(parts.group("port")) if parts.group("port") else DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise refuse(f"the port {port} is out of range")
    reason = _odd_host(host)
    if reason:
        raise refuse(reason)
    host = host.strip("[]")
    # The decisive check: the parser the token check uses and the one the HTTP client connects with agree.
    try:
        split = urlsplit(url)
        ours = (split.scheme.lower(), (split.hostname or "").lower(), split.port or DEFAULT_PORTS[scheme])
        theirs = urllib3.util.parse_url(url)
        client = ((theirs.scheme or "").lower(), (theirs.host or "").lower().strip("[]"),
                  theirs.port or DEFAULT_PORTS[scheme])
    except ValueError as error:
        raise refuse(f"it cannot be parsed ({error})") from None
    if ours != (scheme, host, port) or client != (scheme, host, port):
        raise refuse("URL parsers disagree on its host")
    return Url(scheme, host, port)


def _odd_host(host: str) -> str | None:
    """Why ``host`` (lower case, IPv6 in brackets) is not a plain host name or address, or None."""
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"'{host}' is not an IPv6 address"
        return None
    if len(host) > 253:
        return "the host name is too long"
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return f"'{host}' is not a valid host name"
    if labels[-1].isdigit() or labels[-1].startswith("0x"):
        # 2130706433, 127.1, 0x7f.0.0.1, 0177.0.0.1 all reach 127.0.0.1: only the dotted quad is accepted.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"'{host}' is an IPv4 address in an unusual form: write it as four decimal numbers (a.b.c.d)"
    return None


# --------------------------------------------------------------------------------------------------------
# The allow-list


@dataclass(frozen=True)
class HostRule:
    """One entry of SAM_IMAGE_HOSTS."""

    kind: str  # "any" | "public" | "name" | "suffix" | "network"
    value: str = ""
    port: int | None = None

    def matches_name(self, url: Url) -> bool:
        """Whether the entry admits ``url`` by its host name alone (no address check)."""
        if self.port is not None and self.port != url.port:
            return False
        if self.kind == "any":
            return True
        host = url.host.rstrip(".")
        if self.kind == "name":
            return host == self.value
        if self.kind == "suffix":
            return host.endswith("." + self.value)
        if self.kind == "network":
            ip = url.ip
            return ip is not None and ip in ipaddress.ip_network(self.value)
        return False

    def admits_address(self, ip: IP, port: int) -> bool:
        """Whether the entry admits a connection to the resolved address ``ip``."""
        if self.port is not None and self.port != port:
            return False
        if self.kind == "public":
            return is_public(ip)
        if self.kind == "network":
            return ip in ipaddress.ip_network(self.value)
        return False


def is_public(ip: IP) -> bool:
    """A globally routable unicast address: not private, loopback, link-local (cloud metadata), multicast..."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class HostPolicy:
    """Which hosts besides Label Studio's origin the backend may fetch images from (SAM_IMAGE_HOSTS)."""

    def __init__(self, rules: tuple[HostRule, ...], text: str) -> None:
        self.rules = rules
        self.text = text

    @classmethod
    def parse(cls, text: str) -> HostPolicy:
        """Entries separated by commas or spaces; ``ValueError`` naming the first one that is not understood."""
        rules: list[HostRule] = []
        for entry in re.split(r"[,\s]+", text.strip()):
            if entry and entry.lower() != "none":  # "none": nothing but Label Studio's origin
                rules.append(_rule(entry))
        return cls(tuple(rules), text.strip())

    def __repr__(self) -> str:
        return f"HostPolicy({self.text!r})"

    def trusts(self, url: Url) -> bool:
        """Named by the admin (host name, suffix, network or ``*``): fetched without an address check."""
        return any(rule.matches_name(url) for rule in self.rules)

    def admits(self, ip: IP, port: int) -> bool:
        """Whether a connection to the resolved address ``ip`` is allowed for a host the admin did not name."""
        return any(rule.admits_address(ip, port) for rule in self.rules)


def _rule(entry: str) -> HostRule:
    lowered = entry.lower()
    if lowered == "public":
        return HostRule("public")
    if lowered == "*":
        return HostRule("any")
    try:
        return HostRule("network", str(ipaddress.ip_network(lowered.strip("[]"), strict=False)))
    except ValueError:
        pass
    host, port = lowered, None
    match = re.fullmatch(r"(.+):([0-9]{1,5})", lowered)
    if match and not lowered.startswith("["):
        host, port = match.group(1), int(match.group(2))
        if not 0 < port < 65536:
            raise ValueError(f"{entry!r}: the port is out of range")
    elif lowered.startswith("[") and "]:" in lowered:
        address, _, port_text = lowered.rpartition(":")
        host, port = address, int(port_text) if port_text.isdigit() else -1
        if not 0 < port < 65536:
            raise ValueError(f"{entry!r}: the port is out of range")
    if host == "*":
        return HostRule("any", port=port)
    try:
        return HostRule("network", str(ipaddress.ip_network(host.strip("[]"))), port)
    except ValueError:
        pass
    suffix = host.startswith("*.")
    name = host[2:] if suffix else host
    if _odd_host(name) is not None or not re.search(r"[a-z]", name):
        raise ValueError(f"{entry!r} is not public, *, a host name, *.domain, an IP address or a network "
                         "(each with an optional :port)")
    return HostRule("suffix" if suffix else "name", name.rstrip("."), port)
