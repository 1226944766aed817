"""A hole-punch socket that gives up half-way through a simultaneous open leaves nothing behind.

Seen in the NAT matrix at 20 % loss: the peer's SYN reached our punching socket, our SYN-ACK was
lost, the punch timed out — and trio, which closes a socket itself when ``connect()`` is
cancelled, closed it plainly in SYN-RECV. The kernel kept it as a FIN-WAIT-1 orphan retransmitting
for minutes on (listen port, peer's listen port), and every later punch with that peer failed.
Here the same half-open is made on purpose, in a network namespace of its own: everything our
socket sends is dropped, the "peer" socket's SYN reaches it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from tests.helpers.natlab import ROOT, TEST_PREFIX, natlab, requires_lab

pytestmark = requires_lab

PA, PB = 47011, 47012  # our punching port, the peer's
SCRIPT = f"""
import json, socket, subprocess, sys, trio
sys.path.insert(0, {str(ROOT)!r})
from meshnode.nat.punch import open_from
from tests.helpers.tcpstate import states_on

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["iptables", "-w", "-A", "OUTPUT", "-p", "tcp", "--sport", "{PA}", "-j", "DROP"], check=True)

def states():
    return states_on({PA})

async def main():
    peer = socket.socket()
    peer.setblocking(False)
    peer.bind(("127.0.0.1", {PB}))
    async def punch():
        try:
            await open_from(("127.0.0.1", {PA}), ("127.0.0.1", {PB}), 1.0)
            return "connected"
        except trio.TooSlowError:
            return "timed out"
    async with trio.open_nursery() as n:
        result = []
        async def run():
            result.append(await punch())
        n.start_soon(run)
        await trio.sleep(0.2)
        peer.connect_ex(("127.0.0.1", {PA}))  # its SYN reaches our SYN-SENT socket: SYN-RECV
        await trio.sleep(0.3)
        during = states()
    await trio.sleep(0.3)
    print(json.dumps({{"result": result[0], "during": during, "after": states()}}))

trio.run(main)
"""


def test_a_punch_given_up_in_syn_recv_leaves_no_orphan():
    ns = f"{TEST_PREFIX}-punch-{uuid.uuid4().hex[:6]}"
    natlab.sh("ip", "netns", "add", ns)
    try:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        natlab.sh("ip", "netns", "del", ns, check=False)
    assert got["result"] == "timed out"
    assert "03" in got["during"]  # SYN_RECV: the half-open this test is about
    assert got["after"] == []  # no FIN-WAIT-1 (04) orphan holding the 4-tuple
