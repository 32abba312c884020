"""Ollama's own configuration forms, read the way Ollama reads them.

Operators copy `OLLAMA_HOST` and `OLLAMA_KEEP_ALIVE` from Ollama's docs and
its CLI, so the worker must accept every form Ollama does, or it builds a URL
like `http://127.0.0.1:11434:11434` and fails on every event. The rules
follow Ollama's `envconfig.Host` and `envconfig.KeepAlive`:

* `OLLAMA_HOST`: `host`, `host:port`, `:port`, `scheme://host[:port][/path]`,
  `[::1]`, `[::1]:port` and a bare `::1`; surrounding spaces and quotes are
  ignored. Without a scheme it is `http`; `http://host` without a port means
  port 80 and `https://host` 443, as for Ollama's CLI. A server's bind
  address (`0.0.0.0`, `[::]`, or no host at all, as in `:11434`) means "this
  machine" to a client: the worker connects to loopback.
* `OLLAMA_KEEP_ALIVE`: a Go duration (`5m`, `1h30m`, `300ms`, `-1m`) or a
  whole number of seconds (`3600`, `-1` = forever). Ollama's API takes a
  duration as a JSON string but a number of seconds only as a JSON number:
  the string `"-1"` is refused with `time: missing unit in duration`.
* `think`: `true`/`false`, or a level `low`/`medium`/`high` (models such as
  gpt-oss take only levels).

Unlike Ollama, which falls back to a default with a log line, a value that
cannot be read stops the worker at start with a message naming the variable.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

DEFAULT_PORT = 11434
SCHEME_PORTS = {"http": 80, "https": 443}
ThinkValue = bool | Literal["low", "medium", "high"]
THINK_LEVELS: dict[str, ThinkValue] = {"low": "low", "medium": "medium", "high": "high"}

# A Go duration: an optional sign, then one or more <number><unit>
# (time.ParseDuration). "0" alone needs no unit.
_GO_DURATION_RE = re.compile(
    r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_GO_ZERO_RE = re.compile(r"[-+]?0")
_SECONDS_RE = re.compile(r"[-+]?\d+")
# Host names as resolvers accept them, underscores included (container names).
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def unquote(value: str) -> str:
    """Ollama's `envconfig.Var`: spaces, then quotes, around a value do not count."""
    return value.strip().strip("\"'").strip()


@dataclass(frozen=True, slots=True)
class OllamaAddress:
    """Where Ollama is, as read from `OLLAMA_HOST` (a port or scheme it left open is None)."""

    scheme: str | None
    host: str
    port: int | None
    path: str

    def url(self, *, port: int | None, use_tls: bool) -> str:
        """The base URL; `port` (OLLAMA_PORT, when set) fills in a port the host left open.

        Left open and not set: `http://host` is port 80 (https: 443) for
        Ollama's CLI, and a bare host is Ollama's own port.
        """
        scheme = self.scheme or ("https" if use_tls else "http")
        port = self.port or port
        if port is None:
            port = SCHEME_PORTS[scheme] if self.scheme is not None else DEFAULT_PORT
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{port}{self.path}"


def parse_ollama_host(value: str) -> OllamaAddress:
    """Read `OLLAMA_HOST` in any form Ollama accepts; ValueError says what is wrong."""
    text = unquote(value)
    scheme: str | None = None
    rest = text
    if "://" in text:
        given, _, rest = text.partition("://")
        scheme = given.lower()
        if scheme not in SCHEME_PORTS:
            raise ValueError(
                f"scheme {given!r} is not supported: use http://, https:// or a bare host[:port]")
    hostport, slash, path = rest.partition("/")
    path = f"/{path}".rstrip("/") if slash else ""
    if "@" in hostport:
        raise ValueError("credentials in the address are not supported; "
                         "put the host and port only")
    host, port = _split_host_port(hostport)
    return OllamaAddress(scheme=scheme, host=_client_host(host), port=port, path=path)


def _split_host_port(hostport: str) -> tuple[str, int | None]:
    if hostport.startswith("["):
        inside, closing, after = hostport[1:].partition("]")
        if not closing:
            raise ValueError(f"{hostport!r} opens '[' but never closes it")
        if after and not after.startswith(":"):
            raise ValueError(f"unexpected {after!r} after the IPv6 address")
        _ipv6(inside)
        return inside, _port(after[1:]) if after else None
    colons = hostport.count(":")
    if colons == 0:
        return hostport, None
    if colons == 1:
        host, _, port = hostport.partition(":")
        return host, _port(port)
    # Several colons and no brackets: a bare IPv6 address (`::1`), no port.
    _ipv6(hostport)
    return hostport, None


def _ipv6(text: str) -> None:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IPv6 address (write [address]:port for one with a port)"
        ) from None


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def _client_host(host: str) -> str:
    """A server's bind address, or none, is this machine: connect to loopback."""
    if not host:
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or an IP address") from None
        return host
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return address.compressed


def parse_keep_alive(value: str) -> str | int:
    """`OLLAMA_KEEP_ALIVE` as the API wants it: a duration string, or seconds as a number."""
    text = unquote(value)
    if _SECONDS_RE.fullmatch(text):
        return int(text)
    if _GO_DURATION_RE.fullmatch(text) or _GO_ZERO_RE.fullmatch(text):
        return text
    raise ValueError(
        "must be a duration such as 5m, 1h30m or 300ms (units ns, us, ms, s, m, h), "
        "or a whole number of seconds such as 3600 (-1 keeps the model loaded forever)")


def parse_think(value: object) -> ThinkValue:
    """`OLLAMA_THINK`: a boolean, or a thinking level for models that take levels."""
    if isinstance(value, bool):
        return value
    text = unquote(str(value)).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if text in THINK_LEVELS:
        return THINK_LEVELS[text]
    raise ValueError("must be true, false, low, medium or high")
