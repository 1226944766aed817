"""TCP socket states on a local port, read from /proc/net/tcp (IPv4; hex codes as the kernel
writes them: 03 SYN_RECV, 04 FIN_WAIT1, 05 FIN_WAIT2, 06 TIME_WAIT, 07 CLOSE, 08 CLOSE_WAIT,
09 LAST_ACK, 0A LISTEN, 0B CLOSING). Stdlib only: tests also run it inside a namespace's Python."""

from __future__ import annotations

CLOSING = frozenset({"04", "05", "06", "07", "08", "09", "0B"})


def states_on(local_port: int) -> list[str]:
    """The state of every IPv4 TCP socket bound to ``local_port``, in the current namespace."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return [r[3] for r in rows if int(r[1].split(":")[1], 16) == local_port]
