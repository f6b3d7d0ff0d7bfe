"""The server's settings (kept apart from the app so the command line can read them without the web stack).

Every setting is checked, with bounds that keep the server working, and the address is bound (``bind``) before the
model loads: a setting that would break the server is a one-line error in seconds, not after minutes of loading.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

from loramoe.errors import ConfigError
from loramoe.validation import Rule, check_fields, is_int, number

API_KEY_ENV = "LORAMOE_API_KEY"


@dataclass
class ServeConfig:
    """Settings of ``loramoe serve``.

    Attributes:
        host: address to listen on; the default serves this machine only.
        port: port to listen on (0: any free port; the log line says which).
        model_name: the id clients send as ``model`` and ``/v1/models`` lists; empty: the adapter directory's name,
            else the base model's name.
        max_batch_size: most requests decoded together, one forward serving them all (so also the most answered
            at once).
        batch_wait_ms: how long a batch that is not full waits for more requests after its first one arrived
            (at most 60000).
        max_queue: most requests waiting for a batch (at least 1); beyond it requests get 429.
        max_prompt_tokens: longest prompt accepted, in tokens.
        max_tokens: most tokens generated per request (also the default when a request names none).
        max_body_bytes: largest request body accepted.
        timeout: seconds a request may take, waiting and decoding; beyond it the client gets 504.
        read_timeout: seconds a client has to send a request's headers (then the connection is closed), and
            again its body (then it gets 408).
        write_timeout: seconds a response may wait for its client to read it (the connection's send buffers full);
            then the connection is closed and its request given up, as when the client hangs up.
        max_connections: most open connections; a new one beyond it closes the one that has waited longest for
            its client to send a request, or is refused with 503 when every connection has a request in hand.
        api_key: the key clients must send as ``Authorization: Bearer KEY`` (printable ASCII, no spaces);
            empty: read $LORAMOE_API_KEY, and if that is unset or empty too, no key is needed.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = ""
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 64
    max_prompt_tokens: int = 4096
    max_tokens: int = 512
    max_body_bytes: int = 1_000_000
    timeout: float = 300.0
    read_timeout: float = 30.0
    write_timeout: float = 30.0
    max_connections: int = 200
    api_key: str = ""

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "model_name": (
                    lambda v: isinstance(v, str) and v.strip() == v and v.isprintable() and len(v) <= 256,
                    "printable text of at most 256 characters without surrounding spaces (or empty)",
                ),
                "host": (lambda v: isinstance(v, str) and v.strip() == v != "", "a host name or address"),
                "port": _between(0, 65535, "(0: any free port)"),
                "max_batch_size": _between(1, 4096),
                "max_prompt_tokens": _between(1, 10**7),
                "max_tokens": _between(1, 10**7),
                "max_body_bytes": _between(1024, 1 << 30),  # below 1 KiB hardly a request fits
                "max_queue": _between(1, 10**6),
                "batch_wait_ms": number(0, 60_000),
                "timeout": number(0, 86_400, low_open=True),
                "read_timeout": number(0.1, 3_600),  # below it, a client on another machine hardly makes it
                "write_timeout": number(0.1, 3_600),
                "max_connections": _between(1, 10**6),
            },
        )
        files = _open_files()
        if self.max_connections > files - _SPARE_FILES:
            raise ConfigError(
                f"max_connections is {self.max_connections}, more connections than this process may open (it may "
                f"open {files} files, {_SPARE_FILES} kept for the rest); lower it or raise the limit (ulimit -n)"
            )
        where = "api_key"
        if not self.api_key:
            self.api_key, where = os.environ.get(API_KEY_ENV, ""), f"${API_KEY_ENV}"
        if self.api_key and not _KEY.fullmatch(self.api_key):
            raise ConfigError(
                f"{where} must be printable ASCII without spaces (clients send it in an HTTP header), got a "
                f"{len(self.api_key)}-character key that is not; leave it empty to serve without a key"
            )

    def bind(self) -> socket.socket:
        """A socket bound to ``host``:``port``, not yet listening (so connections are refused, not queued, while
        the model loads).

        Raises:
            ConfigError: the address cannot be resolved or bound, saying why.
        """
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as err:
            raise ConfigError(
                f"host {self.host!r}: not an address this machine can listen on ({_reason(err)}); use an IP "
                "address of this machine, 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)"
            ) from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError as err:
            sock.close()
            raise ConfigError(
                f"cannot listen on {self.host}:{self.port} ({_reason(err)}); choose another --host or --port "
                "(--port 0 takes any free port)"
            ) from None
        return sock


# An HTTP header value a client can send and the server compares as sent (no surrounding spaces to strip).
_KEY = re.compile(r"[\x21-\x7e]+")
_SPARE_FILES = 32  # file descriptors kept for the model's files, logs and the listening socket


def _between(low: int, high: int, note: str = "") -> Rule:
    return (
        lambda v: is_int(v) and low <= v <= high
    ), f"an integer in {low}..{high}{' ' + note if note else ''}"


def _open_files() -> int:
    """How many files this process may open (the soft limit); a connection needs one."""
    try:
        import resource
    except ImportError:  # Windows
        return 1 << 16
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _reason(err: OSError) -> str:
    return err.strerror or str(err)
