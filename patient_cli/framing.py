"""Messages between this program's own processes: `import`'s workers and its
service process, each a fork of the command, over a socket pair that no other
process can open. A message is a pickle behind its length.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

LENGTH = struct.Struct(">Q")


def encode(value: object) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def send(sock: socket.socket, value: object) -> None:
    data = encode(value)
    sock.sendall(LENGTH.pack(len(data)))
    sock.sendall(data)


def receive(reader: Any) -> Any:
    """The next message from a buffered binary reader, or None at end of input."""
    header = reader.read(LENGTH.size)
    if len(header) < LENGTH.size:
        return None
    (length,) = LENGTH.unpack(header)
    data = reader.read(length)
    if len(data) < length:
        return None
    # Only ever from our own fork, over a socket pair no one else can open.
    return pickle.loads(data)  # noqa: S301
