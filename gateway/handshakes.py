"""Failed CurveZMQ handshakes on the gateway's socket, written to its log.

A client with the wrong server key (a token of another pool), the replayed recording of an
old session, or anything that is not a bitfusion client fails the handshake inside libzmq and
never reaches the gateway's code: the socket monitor is the only place that sees it. For an
accepted connection libzmq's monitor names the listening endpoint, not the peer (only its
draft v2 monitor has both), so the line says where, and why, but not who.
"""

from __future__ import annotations

import errno
import os
import struct

import zmq
import zmq.asyncio

from gateway.log_limit import LogLimit

FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
FLUSH_EVERY_MS = 5000  # also close the log limiter's windows while nothing fails

_PROTOCOL_ERRORS = {
    int(getattr(zmq, name)): name.removeprefix("PROTOCOL_ERROR_")
    for name in dir(zmq)
    if name.startswith("PROTOCOL_ERROR_")
}

_NOT_ZMTP = {"ZMTP_MECHANISM_MISMATCH", "ZMTP_UNEXPECTED_COMMAND"} | {
    name for name in _PROTOCOL_ERRORS.values() if name.startswith("ZMTP_MALFORMED_COMMAND")
}


def describe(event: int, value: int) -> str:
    """Why a handshake failed, in a few words."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        reason = _PROTOCOL_ERRORS.get(value, str(value))
        if reason in _NOT_ZMTP:
            return f"it does not speak ZMTP with CurveZMQ ({reason}): not a bitfusion client"
        # The curve codes do not tell the causes apart reliably (a wrong key is mostly
        # ZMTP_CRYPTOGRAPHIC, a replay ZMTP_UNSPECIFIED), so the line names them all.
        return (
            f"its CurveZMQ handshake failed ({reason}): a client whose token has another "
            "pool's server key, a replayed recording of another session, or not a bitfusion "
            "client"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"it was not authorised (status {value})"
    name = errno.errorcode.get(value)
    return f"{name}: {os.strerror(value)}" if name else f"error {value}"


async def watch(sock: zmq.asyncio.Socket, limit: LogLimit) -> None:
    """Log every failed handshake on ``sock`` (through ``limit``) until cancelled."""
    monitor = sock.get_monitor_socket(FAILED)
    try:
        while True:
            if await monitor.poll(FLUSH_EVERY_MS):
                frames = await monitor.recv_multipart()
                # zmq_socket_monitor's format: 16-bit event, 32-bit value; then the endpoint.
                event, value = struct.unpack("=HI", frames[0][:6])
                endpoint = frames[1].decode(errors="replace") if len(frames) > 1 else "?"
                if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                    # A peer that hung up mid-handshake: a port probe, a health check, a
                    # network drop. Worth a line, not a warning.
                    limit.info(
                        "hangup",
                        "a connection on %s ended before its handshake (%s)",
                        endpoint,
                        describe(event, value),
                    )
                else:
                    limit.warning(
                        "handshake",
                        "refused a connection on %s before any message: %s",
                        endpoint,
                        describe(event, value),
                    )
            limit.flush()
    finally:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(0)
