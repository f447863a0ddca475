# -*- test-case-name: timtx.test.test_accounts -*-
"""
Registration, one-time login tokens, login and password changes.

Password work runs in a thread pool, never on the reactor thread.  Logins to
unknown accounts spend the same hashing time as real ones, so timing does
not reveal which names exist.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from timtx.chat.loginguard import LoginGuard
from timtx.chat.loginwebhook import LoginWebhook
from timtx.config import AccountsConfig
from timtx.crypto.ids import NodeKeys
from timtx.crypto.passwords import PasswordHasher
from timtx.persistence.interfaces import IMessageStore
from timtx.persistence.records import Account, TokenGrant
from timtx.protocols.constants import ErrorCode
from timtx.protocols.errors import TimProtocolError
from timtx.protocols.structs import TimAuth

T = TypeVar("T")
RunInThread = Callable[..., "Deferred[Any]"]

#: Tokens are below 2**53 so that tim 2.0's JSON clients, which carry the
#: token as a JavaScript number, get it back intact.
TOKEN_BITS = 53


class AccountService:
    """
    @param runInThread: C{runInThread(f, *args)} runs C{f} off the reactor
        thread and returns a L{Deferred} of its result.
    @param webhook: an optional L{timtx.chat.loginwebhook.LoginWebhook}.
    """

    log = Logger()

    def __init__(
        self,
        config: AccountsConfig,
        *,
        store: IMessageStore,
        keys: NodeKeys,
        clock: IReactorTime,
        runInThread: RunInThread,
        webhook: LoginWebhook | None = None,
    ):
        self.config = config
        self.store = store
        self.keys = keys
        self.clock = clock
        self.hasher = PasswordHasher(config.scrypt_n, config.scrypt_r, config.scrypt_p)
        self._runInThread = runInThread
        self.webhook = webhook
        self._known: OrderedDict[str, None] = OrderedDict()
        self.guard = LoginGuard(
            clock,
            freePerAddress=config.login_free_failures_per_ip,
            freePerAccountAddress=config.login_free_failures_per_account,
            spread=config.login_spread_ips,
            window=config.login_failure_window,
            maxBackoff=config.login_backoff_max,
        )

    # Checks of what a client sent.

    def _credentials(self, auth: TimAuth) -> tuple[str, str, str]:
        name, pwd, domain = auth.name, auth.pwd, auth.domain or ""
        if not name or len(name) > self.config.name_max_length:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, f"name must be 1 to {self.config.name_max_length} characters")
        if len(domain) > self.config.domain_max_length:
            raise TimProtocolError(
                ErrorCode.ERR_PARAMS, f"domain must be at most {self.config.domain_max_length} characters"
            )
        if pwd is None or len(pwd) > self.config.password_max_length:
            raise TimProtocolError(ErrorCode.ERR_PARAMS, "a password is required")
        return name, pwd, domain

    def _checkNewPassword(self, pwd: str | None) -> str:
        low, high = self.config.password_min_length, self.config.password_max_length
        if pwd is None or not (low <= len(pwd) <= high):
            raise TimProtocolError(ErrorCode.ERR_PARAMS, f"password must be {low} to {high} characters")
        return pwd

    # Operations.

    @inlineCallbacks
    def register(self, auth: TimAuth) -> Any:
        """
        Create the account C{auth.name} in C{auth.domain}.

        @return: a L{Deferred} firing with the new account id.
        @raise TimProtocolError: C{ERR_PARAMS} for a bad name or password,
            C{ERR_HASEXIST} if the account exists.
        """
        name, pwd, domain = self._credentials(auth)
        self._checkNewPassword(pwd)
        uid = self.keys.accountId(name, domain)
        if (yield self.store.getAccount(uid)) is not None:
            raise TimProtocolError(ErrorCode.ERR_HASEXIST, "account exists")
        passwordHash = yield self._runInThread(self.hasher.hash, pwd)
        created = yield self.store.createAccount(Account(uid, domain, passwordHash, self.clock.seconds()))
        if not created:
            raise TimProtocolError(ErrorCode.ERR_HASEXIST, "account exists")
        self.log.info("registered account {uid}", uid=uid)
        return uid

    @inlineCallbacks
    def checkPassword(self, name: str, pwd: str, domain: str) -> Any:
        """
        @return: a L{Deferred} firing with the L{Account} if C{pwd} is its
            password, else C{None}.
        """
        uid = self.keys.accountId(name, domain)
        account = yield self.store.getAccount(uid)
        if account is None:
            yield self._runInThread(self.hasher.burn, pwd)
            return None
        ok = yield self._runInThread(self.hasher.verify, pwd, account.passwordHash)
        if not ok:
            return None
        if self.hasher.needsRehash(account.passwordHash):
            newHash = yield self._runInThread(self.hasher.hash, pwd)
            yield self.store.setPasswordHash(uid, newHash)
        return account

    def _guarded(self, uid: str | None, peer: str) -> None:
        """
        @raise TimProtocolError: C{ERR_OVERHZ} if C{peer} must wait before it
            tries to log in to C{uid} again (see L{LoginGuard}).
        """
        wait = self.guard.wait(uid, peer)
        if wait > 0:
            raise TimProtocolError(
                ErrorCode.ERR_OVERHZ, f"too many failed logins; try again in {max(1, round(wait))} s"
            )

    def _failed(self, uid: str | None, peer: str, why: str) -> None:
        self.guard.failed(uid, peer)
        # The account id and address, never the name or the password.
        self.log.warn("login failed for {uid} from {peer}: {why}", uid=uid or "(token)", peer=peer, why=why)

    @inlineCallbacks
    def issueToken(self, auth: TimAuth, peer: str = "") -> Any:
        """
        A one-time login token for the account whose password C{auth}
        holds, valid for C{token_ttl} seconds.

        @param peer: the client's address, for the failure budgets.
        @return: a L{Deferred} firing with the token, an int below 2**53.
        @raise TimProtocolError: C{ERR_NOPASS} for a wrong name or password,
            C{ERR_OVERHZ} while C{peer} backs off.
        """
        name, pwd, domain = self._credentials(auth)
        uid = self.keys.accountId(name, domain)
        self._guarded(uid, peer)
        account = yield self.checkPassword(name, pwd, domain)
        if account is None:
            self._failed(uid, peer, "wrong name or password (token request)")
            raise TimProtocolError(ErrorCode.ERR_NOPASS, "wrong name or password")
        self.guard.succeeded(uid, peer)
        token = yield self.grantToken(account.uid, account.domain)
        return token

    def grantToken(self, uid: str, domain: str) -> Deferred[int]:
        """
        A one-time login token for the account C{uid}, without its password:
        for the operator's API (tim's C{/timToken}).
        """
        token = secrets.randbits(TOKEN_BITS) | 1
        expires = self.clock.seconds() + self.config.token_ttl
        d = self.store.addToken(self.keys.tokenKeyFor(token), TokenGrant(uid, domain), expires)
        return d.addCallback(lambda _: token)

    @inlineCallbacks
    def authenticate(self, auth: TimAuth, peer: str = "") -> Any:
        """
        Check a TIMAUTH: by token if it has one, else by name and password.

        A spent or unknown token falls back to the name and password when the
        same frame carries them: timjs keeps one TimAuth for its lifetime and
        reconnects with its spent token and its password.

        @param peer: the client's address, for the failure budgets.
        @return: a L{Deferred} firing with the L{TokenGrant} (uid and
            domain) of the account.
        @raise TimProtocolError: C{ERR_TOKEN} for a bad token, C{ERR_AUTH}
            for a bad name or password or a refusal by the login webhook,
            C{ERR_OVERHZ} while C{peer} backs off after failures.
        """
        claimed = self.keys.accountId(auth.name, auth.domain or "") if auth.name else None
        self._guarded(claimed, peer)
        grant = None
        if auth.token is not None and auth.token != "":
            grant = yield self.store.takeToken(self.keys.tokenKeyFor(auth.token), self.clock.seconds())
            if grant is None and not (auth.name and auth.pwd):
                self._failed(claimed, peer, "invalid or expired token")
                raise TimProtocolError(ErrorCode.ERR_TOKEN, "invalid or expired token")
            if grant is not None and auth.name and self.keys.accountId(auth.name, auth.domain) != grant.uid:
                # tim 2.1 sends name and domain with the token; they must agree.
                raise TimProtocolError(ErrorCode.ERR_TOKEN, "token does not belong to this account")
        if grant is None:
            if not auth.name or auth.pwd is None:
                raise TimProtocolError(ErrorCode.ERR_AUTH, "name and password, or a token, are required")
            name, pwd, domain = self._credentials(auth)
            account = yield self.checkPassword(name, pwd, domain)
            if account is None:
                self._failed(claimed, peer, "wrong name or password")
                raise TimProtocolError(ErrorCode.ERR_AUTH, "wrong name or password")
            grant = TokenGrant(account.uid, account.domain)
        if self.webhook is not None:
            allowed = yield self.webhook.approve(auth)
            if not allowed:
                self.log.warn("login of {uid} from {peer} refused by the webhook", uid=grant.uid, peer=peer)
                raise TimProtocolError(ErrorCode.ERR_AUTH, "login refused")
        self.guard.succeeded(grant.uid, peer)
        return grant

    @inlineCallbacks
    def changePassword(self, uid: str, old: str | None, new: str | None) -> Any:
        """
        @raise TimProtocolError: C{ERR_MODIFYAUTH} if C{old} is wrong,
            C{ERR_PARAMS} if C{new} is out of bounds.
        """
        self._checkNewPassword(new)
        account = yield self.store.getAccount(uid)
        if account is None or old is None:
            raise TimProtocolError(ErrorCode.ERR_MODIFYAUTH)
        ok = yield self._runInThread(self.hasher.verify, old, account.passwordHash)
        if not ok:
            raise TimProtocolError(ErrorCode.ERR_MODIFYAUTH)
        newHash = yield self._runInThread(self.hasher.hash, new)
        yield self.store.setPasswordHash(uid, newHash)

    @inlineCallbacks
    def resetPassword(self, uid: str, new: str | None) -> Any:
        """
        Set the password of C{uid} without the old one: for the operator's
        API (tim's C{/timResetAuth}).

        @raise TimProtocolError: C{ERR_PARAMS} if C{new} is out of bounds,
            C{ERR_ACCOUNT} if there is no such account.
        """
        self._checkNewPassword(new)
        if (yield self.store.getAccount(uid)) is None:
            raise TimProtocolError(ErrorCode.ERR_ACCOUNT, "no such account")
        newHash = yield self._runInThread(self.hasher.hash, new)
        yield self.store.setPasswordHash(uid, newHash)

    def exists(self, uid: str) -> Deferred[bool]:
        """
        Whether an account C{uid} exists.  Known accounts are remembered
        (accounts are never deleted), so repeated checks cost nothing.
        """
        if uid in self._known:
            self._known.move_to_end(uid)
            return succeed(True)
        return self.store.getAccount(uid).addCallback(self._checked, uid)

    def isKnown(self, uid: str) -> bool:
        """
        Whether C{uid} is known to exist without asking the store.
        """
        return uid in self._known

    def _checked(self, account: Any, uid: str) -> bool:
        if account is None:
            return False
        self._known[uid] = None
        while len(self._known) > 100_000:
            self._known.popitem(last=False)
        return True

    def purgeExpiredTokens(self) -> Deferred[int]:
        return self.store.purgeTokens(self.clock.seconds())
