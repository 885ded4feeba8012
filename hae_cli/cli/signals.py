"""SIGTERM and SIGHUP end a run the way Ctrl-C does: decoding stops, and what was generated is
written (the answer and summary, or the JSON with `"interrupted": true`), then `hae` exits with
128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP).

Each of these signals raises `KeyboardInterrupt`, the one interruption every layer already
handles (the decode loop returns its partial result, a profile keeps the prompts that finished).
While the result is being written the signals are only noted (`writing_result`), so a second
one cannot cut a JSON document in half.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOPPING = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class _Received:
    signum: int | None = None
    holding: bool = False


_received = _Received()


def _stop(signum: int, frame) -> None:
    _received.signum = signum
    if not _received.holding:
        raise KeyboardInterrupt


@contextmanager
def _handling(handler) -> Iterator[bool]:
    """`handler` for every stopping signal while inside, the previous handlers after. Yields
    False (and sets nothing) off the main thread, where no handler may be set."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOPPING}
    try:
        yield True
    finally:
        for signum, previous_handler in previous.items():
            signal.signal(signum, previous_handler)


@contextmanager
def stop_like_ctrl_c() -> Iterator[None]:
    """For the length of a command, SIGTERM and SIGHUP (and Ctrl-C) raise `KeyboardInterrupt`."""
    with _handling(_stop) as installed:
        if installed:
            _received.signum, _received.holding = None, False
        yield


@contextmanager
def writing_result() -> Iterator[None]:
    """While the result is written, a stopping signal is noted, not raised."""
    holding, _received.holding = _received.holding, True
    try:
        yield
    finally:
        _received.holding = holding


def received() -> int | None:
    """The stopping signal this command received, if any."""
    return _received.signum


def received_ends_session() -> bool:
    """SIGTERM or SIGHUP arrived (Ctrl-C only stops what is running)."""
    return _ends_session(_received.signum)


def _ends_session(signum: int | None) -> bool:
    return signum is not None and signum != getattr(signal, "SIGINT", None)


def describe() -> str:
    """'' for Ctrl-C or nothing, else ' (SIGTERM)' for the message that says why it stopped."""
    signum = _received.signum
    if signum is None or signum == getattr(signal, "SIGINT", None):
        return ""
    return f" ({signal.Signals(signum).name})"


def exit_code() -> int:
    """128 + the signal's number, as a shell reports a process the signal ended; 130 (Ctrl-C) when
    the interruption came some other way."""
    return 128 + (_received.signum or signal.SIGINT)


class StopRequest:
    """What `answer_stops_on_signal` noted: a stopping signal arrived (and which)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def ends_session(self) -> bool:
        """SIGTERM and SIGHUP end the whole session; Ctrl-C only the answer."""
        return _ends_session(self.signum)


@contextmanager
def answer_stops_on_signal() -> Iterator[StopRequest]:
    """While an answer decodes, a stopping signal is noted rather than raised, so decoding
    stops between two steps and the cache stays whole (a `KeyboardInterrupt` in the middle of
    a forward would leave some layers a row ahead). The generation loop polls the request."""
    request = StopRequest()

    def note(signum: int, frame) -> None:
        request.signum = signum
        if _ends_session(signum):
            _received.signum = signum

    with _handling(note):
        yield request
