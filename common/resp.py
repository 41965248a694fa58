"""Redis commands sent in one write and answered in order, without redis-py's pipeline machinery.

On the request path every round trip is a short list of commands, one of them carrying an 89 KB
frame. redis-py's ``Pipeline`` spends per command what this path cannot afford: its command stack
and response callbacks, a connection checked out of the pool (which polls it for stray data on
every hand-out), and a packer that copies the frame once through hiredis and then sends the pieces
of a round trip in several writes (docs/benchmarks.md). Here the commands are packed into one
buffer and written at once on a connection of this module's own stack, and the answers are read
with the connection's own (hiredis) parser.

A connection goes back on the stack only after a whole exchange, so none holds unread data; any
error closes it. One that Redis closed while it sat idle (a restart, a proxy's idle timeout) fails
before any answer is read: the idle stack is emptied and the commands go once more on a new
connection (had Redis run them before it closed the connection, they run twice: callers send
only commands for which that is harmless or recovered).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis

Command = Sequence[object]
T = TypeVar("T")


def pack(commands: Iterable[Command]) -> bytes:
    """``commands`` in the Redis protocol (RESP arrays of bulk strings), as one buffer.

    Arguments as redis-py encodes them: bytes as they are, str as UTF-8, int in decimal, float by
    ``repr``; anything else (bool and None included) raises ``redis.DataError``.
    """
    out: list[bytes] = []
    for cmd in commands:
        out.append(b"*%d\r\n" % len(cmd))
        for arg in cmd:
            if isinstance(arg, bytes):
                b = arg
            elif isinstance(arg, str):
                b = arg.encode()
            elif isinstance(arg, int) and not isinstance(arg, bool):
                b = b"%d" % arg
            elif isinstance(arg, float):
                b = repr(arg).encode()
            elif isinstance(arg, (bytearray, memoryview)):
                b = bytes(arg)
            else:
                raise redis.DataError(f"invalid argument of type {type(arg).__name__} in {cmd[0]!r}: {arg!r}")
            out.append(b"$%d\r\n" % len(b))
            out.append(b)
            out.append(b"\r\n")
    return b"".join(out)


class Link:
    """Whole exchanges with the Redis of client ``r`` (its URL, timeouts and parser), on this link's
    own stack of idle connections, last used first. Safe to share between threads: a connection is
    held by one exchange at a time."""

    def __init__(self, r: redis.Redis) -> None:
        self._pool = r.connection_pool
        self._idle: list[redis.Connection] = []

    def _checkout(self) -> tuple[redis.Connection, bool]:
        """An idle connection (True: used before), or a new one with the client's settings."""
        try:
            return self._idle.pop(), True
        except IndexError:
            return self._pool.connection_class(**self._pool.connection_kwargs), False

    def _checkin(self, conn: redis.Connection) -> None:
        """``conn`` after a whole exchange: every answer read."""
        self._idle.append(conn)

    def _forget_idle(self) -> None:
        """Redis closed a connection that sat idle: the others are closed too, the next is new."""
        self._idle.clear()

    def call(self, commands: Sequence[Command], read: Callable[[Callable[[], Any]], T]) -> T:
        """Send ``commands`` in one write, then return ``read(answer)``, where each ``answer()``
        reads the next answer as the connection's parser gives it (an error answer raises
        ``redis.ResponseError``). Whatever ``read`` raises closes the connection (answers may be
        left unread on it) and propagates; connection errors raise as redis-py's do."""
        packed = pack(commands)
        while True:
            conn, reused = self._checkout()
            answer = _Answers(conn)
            try:
                conn.send_packed_command([packed])  # type: ignore[no-untyped-call]
                got = read(answer)
            except BaseException as exc:
                conn.disconnect()  # type: ignore[no-untyped-call]
                if isinstance(exc, redis.ConnectionError) and reused and not answer.count:
                    self._forget_idle()
                    continue
                raise
            self._checkin(conn)
            return got

    def exchange(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` in one write and return their answers in order (bytes, ints, lists,
        None). An error answer raises ``redis.ResponseError`` once every answer is read (the first
        one); connection errors raise as redis-py's do."""

        def read_all(answer: Callable[[], Any]) -> list[Any]:
            answers: list[Any] = []
            for _ in commands:
                try:
                    answers.append(answer())
                except redis.ResponseError as exc:
                    answers.append(exc)
            return answers

        answers = self.call(commands, read_all)  # the connection is back on the stack, in step
        error = next((a for a in answers if isinstance(a, redis.ResponseError)), None)
        if error is not None:
            raise error
        return answers


class _Answers:
    """Reads one exchange's answers, one a call, and counts those read (an error answer too)."""

    def __init__(self, conn: redis.Connection) -> None:
        self._conn = conn
        self.count = 0

    def __call__(self) -> Any:
        try:
            got = self._conn.read_response()
        except redis.ResponseError:  # an answer too: the connection is in step
            self.count += 1
            raise
        self.count += 1
        return got
