"""A TCP forwarder on loopback whose path can die silently: after :meth:`SilentPipe.go_silent`
it swallows every byte both ways while both sockets stay open, no FIN, no RST. That is what a
punched connection looks like to the side that completed it when the other side's failed and
its reset was lost: the kernel still calls the connection established."""

from __future__ import annotations

import trio


class SilentPipe:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.silent = False

    def go_silent(self) -> None:
        self.silent = True

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._forward, listeners)

    async def _forward(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as upstream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream)
                nursery.start_soon(self._pump, upstream, client)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        while data := await src.receive_some(65536):
            if not self.silent:
                await dst.send_all(data)
