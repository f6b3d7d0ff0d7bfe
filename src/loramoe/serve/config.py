"""The server's settings (kept apart from the app so the command line can read them without the web stack)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from loramoe.validation import check_fields, integer, is_int, number

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
        batch_wait_ms: how long a batch that is not full waits for more requests after its first one arrived.
        max_queue: most requests waiting for a batch; beyond it requests get 429.
        max_prompt_tokens: longest prompt accepted, in tokens.
        max_tokens: most tokens generated per request (also the default when a request names none).
        max_body_bytes: largest request body accepted.
        timeout: seconds a request may take, waiting and decoding; beyond it the client gets 504.
        api_key: the key clients must send as ``Authorization: Bearer KEY``; empty: read $LORAMOE_API_KEY, and
            if that is unset too, no key is needed.
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
    api_key: str = ""

    def __post_init__(self) -> None:
        check_fields(
            self,
            {
                "max_batch_size": integer(1),
                "max_prompt_tokens": integer(1),
                "max_tokens": integer(1),
                "max_body_bytes": integer(1),
                "max_queue": integer(0),
                "port": (
                    lambda v: is_int(v) and 0 <= v <= 65535,
                    "an integer in 0..65535 (0: any free port)",
                ),
                "batch_wait_ms": number(0),
                "timeout": (number(0, low_open=True)[0], "a positive number of seconds"),
            },
        )
        if not self.api_key:
            self.api_key = os.environ.get(API_KEY_ENV, "")
