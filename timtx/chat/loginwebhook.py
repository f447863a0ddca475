# -*- test-case-name: timtx.test.test_login -*-
"""
An external login approval, as tim's C{connectauthurl}: the TimAuth of every
login is POSTed as JSON to a URL, and the login proceeds only if the
response body starts with C{1}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from timtx.protocols.codec import encode_json
from timtx.protocols.structs import TimAuth
from timtx.util.bodies import BytesProducer


class LoginWebhook:
    log = Logger()

    def __init__(self, reactor: Any, url: str, timeout: float):
        self._reactor = reactor
        self._agent = Agent(reactor, connectTimeout=timeout)
        self.url = url.encode("ascii")
        self.timeout = timeout

    @inlineCallbacks
    def approve(self, auth: TimAuth) -> Any:
        """
        @return: a L{Deferred} firing with whether the webhook allowed the
            login.  Errors and timeouts count as a refusal.
        """
        body = BytesProducer(encode_json(auth))
        request = self._agent.request(b"POST", self.url, Headers({b"Content-Type": [b"application/json"]}), body)
        request.addTimeout(self.timeout, self._reactor)
        try:
            response = yield request
            content = yield readBody(response)
        except Exception as e:
            self.log.warn("login webhook failed: {error}", error=repr(e))
            return False
        return content[:1] == b"1"
