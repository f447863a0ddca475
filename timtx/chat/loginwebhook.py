# -*- test-case-name: timtx.test.test_webhook -*-
"""
An external login approval, as tim's C{connectauthurl}: the TimAuth of every
login is POSTed as JSON to a URL, and the login proceeds only if the
response body starts with C{1}.

The TimAuth holds the password (or the token) in clear: the URL should be
on loopback or C{https://}.  Whatever the webhook does, a login waits at
most C{timeout} seconds for the whole answer, and no more than
L{MAX_BODY_BYTES} of it are read.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers

from timtx.protocols.codec import encode_json
from timtx.protocols.structs import TimAuth
from timtx.util.bodies import BytesProducer

#: Bytes of the webhook's answer that are read; only the first one counts.
MAX_BODY_BYTES = 64


class _Head(Protocol):
    """
    Reads at most C{limit} bytes of a response body, then stops the
    transfer.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data[: self.limit - len(self.data)]
        if len(self.data) >= self.limit and not self.done.called:
            self.done.callback(self.data)
            transport: Any = self.transport
            transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            if reason.check(ResponseDone) or self.data:
                self.done.callback(self.data)
            else:
                self.done.errback(reason)


class LoginWebhook:
    log = Logger()

    def __init__(self, reactor: Any, url: str, timeout: float):
        self._reactor = reactor
        self._agent = Agent(reactor, connectTimeout=timeout)
        self.url = url.encode("ascii")
        self.timeout = timeout
        if url.startswith("http://") and not _onLoopback(url):
            self.log.warn(
                "login_webhook {url} is plain http off loopback: every login's password crosses the network in clear",
                url=url,
            )

    def approve(self, auth: TimAuth) -> Deferred[bool]:
        """
        @return: a L{Deferred} firing with whether the webhook allowed the
            login.  Errors and timeouts count as a refusal.
        """
        answer = self._ask(auth)
        answer.addTimeout(self.timeout, self._reactor)
        answer.addErrback(self._failed)
        return answer

    @inlineCallbacks
    def _ask(self, auth: TimAuth) -> Any:
        body = BytesProducer(encode_json(auth))
        response = yield self._agent.request(b"POST", self.url, Headers({b"Content-Type": [b"application/json"]}), body)
        head = _Head(MAX_BODY_BYTES)
        response.deliverBody(head)
        content = yield head.done
        return content[:1] == b"1"

    def _failed(self, failure: Failure) -> bool:
        self.log.warn("login webhook failed: {error}", error=failure.getErrorMessage() or repr(failure.value))
        return False


def _onLoopback(url: str) -> bool:
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")
