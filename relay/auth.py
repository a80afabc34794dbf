"""Who is calling, and what they may see or publish. Pure: no HTTP here.

Tokens are random strings handed out by ``storage-events-relay token``; the config keeps only
their SHA-256 (they carry 256 bits of entropy, so a fast hash is enough). Readers may instead
present a JWT (HS256 with a shared secret, or RS256/ES256 checked with a public key or the
issuer's JWKS) whose ``sites`` and ``paths`` claims say what they may read, or, as WLCG and
SciTokens tokens do, whose ``scope`` holds ``storage.read:PATH`` entries; it must expire,
within ``max_lifetime``.
Readers may also log in with HTTP Basic, as dCache's own clients do: a user name and password
of a ``[[user]]`` entry (``storage-events-relay user add``; the config keeps a salted scrypt
hash, slow on purpose, so it is checked off the event loop and remembered for a while), or any
user name with a token as the password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from storage_events.errors import AccessError
from storage_events.relay.feed.filters import FilterError, Scope, normalize_prefix

EVERYTHING = Scope()
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # site and node names
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
Role = Literal["agent", "reader", "relay", "metrics"]
# The fields of a [[token]] entry beyond name/role/hash: the roles that use each, and what for.
# Given to another role a field would be ignored, so it is refused instead: an operator who
# wrote `paths` on a relay token must not believe it restricts anything.
FIELD_ROLES = {
    "site": (("agent", "relay"), "the site an agent publishes as, or a pushing relay's name"),
    "sites": (("reader", "relay"), "the sites a reader may read, or a relay may push"),
    "paths": (("reader",), "the path prefixes a reader may read"),
    "node": (("agent",), "the one node an agent may publish as"),
}


class AuthError(AccessError):
    """Authentication failed (401) or was not enough (403); the message says why."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


class TokenConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    role: Role  # metrics: may scrape /metrics (and read /healthz), nothing else
    hash: Annotated[str, msgspec.Meta(pattern=r"^sha256:[0-9a-f]{64}$")]
    site: Name | None = None  # agent: the one site it may publish as; relay: its name
    sites: list[str] | None = None  # reader: the sites it may read (default: all); relay: the
    # sites it may push events of (default: only its own `site`)
    paths: list[str] | None = None  # reader: the path prefixes it may read (default: all)
    node: Name | None = None  # agent: the one node it may publish as (default: any)

    def __post_init__(self) -> None:
        if self.role == "agent" and self.site is None:
            raise ValueError(f"agent token {self.name!r} needs the site it publishes as")
        if self.role == "relay" and self.site is None:
            raise ValueError(
                f"relay token {self.name!r} needs `site`: the name of the relay that pushes with it"
            )
        for field, (roles, what) in FIELD_ROLES.items():
            if getattr(self, field) is not None and self.role not in roles:
                raise ValueError(
                    f"{self.role} token {self.name!r} takes no `{field}` ({what}; "
                    f"{' and '.join(roles)} tokens only)"
                )

    def scope(self) -> Scope:
        """What it may read (a reader) or push (a relay: only its own site unless `sites`
        names those it may push, so a relay's token cannot forge the streams of other sites)."""
        sites = self.sites
        if self.role == "relay" and sites is None:
            sites = [self.site]
        return _scope(self.name, sites, self.paths)


# scrypt's cost: about 16 MiB and some tens of ms per check, the kind of price that makes
# guessing a stolen hash slow (checked passwords are remembered, so a client logging in with
# every request pays it once).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_PASSWORD_HASH = r"^scrypt:[0-9]+:[0-9]+:[0-9]+:[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+$"


class UserConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A reader logging in with a user name and password (``[[user]]``), as dCache's clients
    do with HTTP Basic."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")]
    hash: Annotated[str, msgspec.Meta(pattern=_PASSWORD_HASH)]
    sites: list[str] | None = None  # the sites it may read (default: all)
    paths: list[str] | None = None  # the path prefixes it may read (default: all)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt:{SCRYPT_N}:{SCRYPT_R}:{SCRYPT_P}:{b64(salt).decode()}:{b64(key).decode()}"


def check_password(password: str, stored: str) -> bool:
    """Blocking, and slow on purpose."""
    _, n, r, p, salt, key = stored.split(":")
    want = base64.b64decode(key)
    got = hashlib.scrypt(
        password.encode(),
        salt=base64.b64decode(salt),
        n=int(n),
        r=int(r),
        p=int(p),
        dklen=len(want),
        maxmem=256 * 1024 * 1024,
    )
    return hmac.compare_digest(got, want)


@dataclass(frozen=True, slots=True)
class Basic:
    """HTTP Basic credentials. A user name may carry a dCache role request, ``alice#admin``
    (dCache's own clients add one): there are no roles here, so it names the user ``alice``."""

    user: str
    password: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "user", self.user.partition("#")[0])

    def key(self) -> bytes:
        return hashlib.sha256(f"{self.user}\0{self.password}".encode()).digest()


Credential = str | Basic  # a token (or JWT), or a user name and password


class JWTConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    algorithms: list[Literal["HS256", "RS256", "ES256"]] = msgspec.field(
        default_factory=lambda: ["HS256"]
    )
    secret: str | None = None  # HS256
    public_key_file: str | None = None  # RS256 / ES256, PEM
    # RS256 / ES256: the issuer's keys, fetched from its JWKS URL (WLCG, SciTokens) and fetched
    # again when a token names a key not among them (the issuer rotated its keys)
    jwks_url: str | None = None
    audience: str | None = None
    issuer: str | None = None
    # Longest lifetime accepted (exp - iat, or exp - now without iat): a leaked token is
    # useful for at most this long.
    max_lifetime: Annotated[int, msgspec.Meta(gt=0)] = 86400


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    role: str  # "agent", "reader", "relay" or "metrics"
    site: str | None = None  # agents; for relays, their name
    scope: Scope = EVERYTHING  # readers; for relays, the sites they may push
    node: str | None = None  # agents bound to one node; None: any node of their site


def bearer(authorization: str, access_token: str | None) -> Credential | None:
    """The credential of a request: ``Authorization: Bearer X`` or ``Basic …``, else an
    ``access_token`` query parameter (for clients such as browsers' EventSource that cannot set
    headers)."""
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    if authorization[:6].lower() == "basic ":
        return basic(authorization[6:].strip())
    return access_token


def basic(encoded: str) -> Basic:
    """``user:password`` in base64; what cannot be decoded gives credentials that fail."""
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return Basic("", "")
    return Basic(user, password) if sep else Basic("", "")


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def _scope(name: str, sites: object, paths: object) -> Scope:
    if sites is not None and not (
        isinstance(sites, list) and all(isinstance(s, str) for s in sites)
    ):
        raise AuthError(f"{name}: 'sites' must be a list of site names")
    if paths is not None and not (
        isinstance(paths, list) and all(isinstance(p, str) for p in paths)
    ):
        raise AuthError(f"{name}: 'paths' must be a list of path prefixes")
    try:
        prefixes = tuple(normalize_prefix(p) for p in paths) if paths is not None else None
    except FilterError as e:
        raise AuthError(f"{name}: {e}") from None
    return Scope(frozenset(sites) if sites is not None else None, prefixes)


BAD_LOGIN = (
    "the user name or password is not valid for this relay (a token may also be given as "
    "the password)"
)
REMEMBERED = 4096  # logins checked, kept for a while: right ones and wrong ones
REMEMBER_FOR = 300.0  # seconds
JWKS_REFETCH = 10.0  # seconds between fetches of the issuer's keys, at least


class Authenticator:
    def __init__(
        self,
        tokens: list[TokenConfig],
        jwt_config: JWTConfig | None,
        users: list[UserConfig] = (),  # type: ignore[assignment]
    ) -> None:
        self._tokens = {t.hash: t for t in tokens}
        self._users = {u.name: u for u in users}
        # Basic logins checked: (when, the identity or the refusal), newest last.
        self._logins: OrderedDict[bytes, tuple[float, Identity | AuthError]] = OrderedDict()
        self._lock = threading.Lock()
        self._jwt = jwt_config
        self._jwt_key: str | None = None
        self._jwks: Any = None  # PyJWKClient, with jwks_url
        self._keys: dict[str, Any] = {}  # key id → key, from the JWKS
        self._keys_fetched = -JWKS_REFETCH
        self._fetching = False
        if jwt_config is not None:
            if jwt_config.jwks_url:
                from jwt import PyJWKClient

                self._jwks = PyJWKClient(jwt_config.jwks_url, cache_keys=False, timeout=10)
            elif jwt_config.public_key_file:
                with open(jwt_config.public_key_file) as f:
                    self._jwt_key = f.read()
            else:
                self._jwt_key = jwt_config.secret
            if not self._jwt_key and self._jwks is None:
                raise ValueError("[jwt] needs `secret` (HS256), `public_key_file` or `jwks_url`")
        # Scopes are immutable and shared by every connection of an identity.
        self._identities = {
            t.hash: Identity(t.name, t.role, t.site, t.scope(), t.node) for t in tokens
        }

    @property
    def challenge(self) -> str:
        """``WWW-Authenticate`` for a reader refused for want of credentials: Basic too where
        users log in with passwords (browsers and ``curl --anyauth`` then ask for them)."""
        return 'Basic realm="storage-events", Bearer' if self._users else "Bearer"

    @property
    def enabled(self) -> bool:
        return bool(self._tokens) or self._jwt is not None or bool(self._users)

    def identify(self, bearer: Credential | None) -> Identity | None:
        """The caller's identity; None for an anonymous caller where that is allowed."""
        if not self.enabled:
            return None
        if not bearer:
            raise AuthError(
                "this relay needs a token: send `Authorization: Bearer TOKEN` "
                "(or ?access_token= where headers cannot be set); readers may also log in "
                "with a user name and password (HTTP Basic)"
            )
        if isinstance(bearer, Basic):
            return self._login(bearer)
        found = self._identities.get(hash_token(bearer))
        if found is not None:
            return found
        if self._jwt is not None and bearer.count(".") == 2:
            return self._from_jwt(bearer)
        raise AuthError("the token is not valid for this relay")

    def needs_check(self, cred: Credential | None) -> bool:
        """Whether identifying ``cred`` would block: the slow password check, or fetching the
        issuer's keys for a JWT naming one not known yet (then do it first, off the event
        loop, with :meth:`check`)."""
        if cred is None:
            return False
        if isinstance(cred, Basic) and cred.user not in self._users:
            cred = cred.password  # (a token or JWT as the password)
        if isinstance(cred, str):
            return self._jwks is not None and cred.count(".") == 2 and self._unknown_key(cred)
        seen = self._logins.get(cred.key())
        return seen is None or time.monotonic() - seen[0] > REMEMBER_FOR

    def check(self, cred: Credential) -> None:
        """Blocking: what :meth:`needs_check` asked for."""
        if isinstance(cred, Basic) and cred.user in self._users:
            self.check_login(cred)
        else:
            self.fetch_keys()

    def _unknown_key(self, token: str) -> bool:
        kid = _key_id(token)
        # (Fetched again at most every JWKS_REFETCH seconds: made-up key ids cost nothing.)
        return (
            kid is not None
            and kid not in self._keys
            # (a request arriving while the keys are being fetched waits for them)
            and (self._fetching or time.monotonic() - self._keys_fetched > JWKS_REFETCH)
        )

    def fetch_keys(self) -> None:
        """Blocking: the issuer's keys, from its JWKS URL."""
        import jwt

        assert self._jwks is not None
        with self._lock:
            if time.monotonic() - self._keys_fetched <= JWKS_REFETCH:
                return
            self._fetching = True
            try:
                keys = self._jwks.get_signing_keys(refresh=True)
                self._keys = {k.key_id: k.key for k in keys if k.key_id}
            except jwt.PyJWKClientError:
                pass  # (the refusal that follows says which key was not found)
            finally:
                self._keys_fetched = time.monotonic()
                self._fetching = False

    def check_login(self, cred: Basic) -> None:
        """Blocking: check a user's password and remember the outcome."""
        user = self._users.get(cred.user)
        result: Identity | AuthError = AuthError(BAD_LOGIN)
        if user is not None and check_password(cred.password, user.hash):
            name = f"user:{user.name}"  # never the same owner as a token's
            result = Identity(name, "reader", None, _scope(name, user.sites, user.paths))
        with self._lock:  # (checks run on threads)
            logins = self._logins
            logins[cred.key()] = (time.monotonic(), result)
            logins.move_to_end(cred.key())
            while len(logins) > REMEMBERED:
                logins.popitem(last=False)

    def _login(self, cred: Basic) -> Identity:
        token = self._identities.get(hash_token(cred.password))
        if token is not None:  # a token as the password, whatever the user name
            return token
        if cred.user not in self._users:
            if self._jwt is not None and cred.password.count(".") == 2:
                return self._from_jwt(cred.password)
            raise AuthError(BAD_LOGIN)
        seen = None if self.needs_check(cred) else self._logins.get(cred.key())
        if seen is None:  # (callers that can run it on a thread did so first)
            self.check_login(cred)
            seen = self._logins[cred.key()]
        result = seen[1]
        if isinstance(result, AuthError):
            raise result
        return result

    def reader(self, bearer: Credential | None) -> Identity | None:
        """The caller as a reader (None: anonymous, allowed); other roles are refused (403)."""
        who = self.identify(bearer)
        if who is not None and who.role != "reader":
            raise AuthError(f"token {who.name!r} is {article(who.role)} token: it cannot read", 403)
        return who

    def _from_jwt(self, token: str) -> Identity:
        import jwt  # PyJWT, only where JWTs are configured

        assert self._jwt is not None
        key: Any = self._jwt_key
        if self._jwks is not None:
            kid = _key_id(token)
            key = self._keys.get(kid) if kid is not None else None
            if key is None:
                raise AuthError(
                    f"the JWT was refused: its key id {kid!r} is not among the keys of "
                    f"{self._jwt.jwks_url} (if the issuer just rotated its keys, try again in "
                    f"{JWKS_REFETCH:.0f} s)"
                )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(self._jwt.algorithms),
                audience=self._jwt.audience,
                issuer=self._jwt.issuer,
                options={"require": ["exp"]},
            )
        except jwt.MissingRequiredClaimError as e:
            if e.claim != "exp":
                raise AuthError(f"the JWT was refused: {e}") from None
            raise AuthError(
                "the JWT was refused: it has no `exp` (expiry) claim; this relay "
                "accepts only JWTs that expire, within "
                f"{self._jwt.max_lifetime} s"
            ) from None
        except jwt.PyJWTError as e:
            raise AuthError(f"the JWT was refused: {e}") from None
        _check_lifetime(claims, self._jwt.max_lifetime)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("the JWT has no `sub` claim: it must say who the reader is")
        name = f"jwt:{sub}"  # never the same owner as a configured token's name
        paths = claims.get("paths")
        if "scope" in claims and paths is None:
            paths = _storage_read(name, claims["scope"])
        return Identity(name, "reader", None, _scope(name, claims.get("sites"), paths))


def _key_id(token: str) -> str | None:
    import jwt

    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        return None
    return kid if isinstance(kid, str) else None


def _storage_read(name: str, scope: object) -> list[str]:
    """The path prefixes a WLCG token's ``scope`` lets it read: each ``storage.read:PATH``
    (``storage.read:/`` everything). One without any reads nothing here."""
    if not isinstance(scope, str):
        raise AuthError(f"{name}: the JWT's 'scope' must be a string of space-separated scopes")
    paths = [
        s.removeprefix("storage.read:") for s in scope.split() if s.startswith("storage.read:")
    ]
    if not paths:
        raise AuthError(
            f"{name}: the JWT's scope grants no storage.read (it has: {scope[:200]!r})", 403
        )
    return [p or "/" for p in paths]


def _check_lifetime(claims: dict, limit: int) -> None:
    # PyJWT has checked that exp (and iat, if present) are integers, exp in the future and
    # iat not: so the lifetime counted from iat is at least what is left of it.
    exp = int(claims["exp"])
    if "iat" in claims:
        lifetime, how = exp - int(claims["iat"]), "exp - iat"
    else:
        lifetime, how = exp - int(time.time()), "exp - now, it has no iat"
    if lifetime > limit:
        raise AuthError(
            f"the JWT was refused: its lifetime of {lifetime} s ({how}) is more "
            f"than this relay accepts, {limit} s ([jwt] max_lifetime); ask its "
            "issuer for a shorter-lived token"
        )


def article(role: str) -> str:
    """The role with its article, for messages: 'an agent', 'a reader'."""
    return f"{'an' if role[0] in 'aeiou' else 'a'} {role}"
