"""Nothing secret and nothing unchecked leaves the gateway: the one scrubber, and output hygiene.

Why it looks like this:

* **One scrubber, every secret.** :class:`Scrubber` is built once from every configured secret
  (provider ``api_key``s, credentials inside ``base_url``s, ``secrets.*``, the admin token,
  telemetry export headers: see ``settings.load_settings``) and applied where text leaves the
  gateway: error bodies and their headers (``middlewares.error_envelope``), every log line
  (the loguru patcher and the direct access-line writer in logs.py), ``/health``.  Providers
  scrub their own errors with the same class before an error leaves them
  (:func:`provider_secrets`), so the span and metric recorded for an attempt never see a key
  either.  An upstream that echoes the key it was sent (some do, in ``message``, ``param`` or
  ``code``) is the threat: ``code`` is upper-cased on the way, so every secret is matched as
  written, upper-cased and lower-cased.
* **Cheap.** A clean line costs one substring test per form of each secret (~0.2 µs each on
  an access line); only text that holds a secret goes through the compiled alternation of
  literal strings, longest first (``re.IGNORECASE`` cost 6x a case-sensitive one).  With no secrets
  configured every call returns its argument after one ``is None`` test.  Secrets shorter than
  :data:`MIN_SECRET_CHARS` are not scrubbed: replacing a 3-letter test token everywhere would
  garble every message and protects nothing.
* **Client bytes in headers and log lines.** :func:`header_value` makes any text safe as a
  response header value (printable ASCII only, bounded), :func:`printable` escapes control
  characters so a CR/LF in a URL path cannot forge a line in the pretty log.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Final
from urllib.parse import unquote, urlsplit, urlunsplit

import orjson

from inference_server.errors import GatewayError, ProviderRejected

#: What a secret is replaced with.
REDACTED: Final = "***"
#: Shorter secrets are not scrubbed (see the module docstring).
MIN_SECRET_CHARS: Final = 8
#: Longest header value the gateway writes from data it did not choose itself.
MAX_HEADER_CHARS: Final = 512
#: What an error ``code`` may look like (it becomes a header-safe, log-safe token).
_CODE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
#: Setting names whose values are secrets, for scrubbing.  Stricter than what ``--print-config``
#: masks (any name containing "token"): ``max_tokens`` or ``completion_tokens`` name OpenAI
#: fields whose values (e.g. Triton input names) would otherwise be scrubbed from every message.
SECRET_NAME: Final = re.compile(r"(api_?key|secret|password|passwd|token(?![a-z]))", re.IGNORECASE)


class Scrubber:
    """Replaces every configured secret in text with ``***`` (see the module docstring)."""

    __slots__ = ("_count", "_forms", "_pattern")

    def __init__(self, secrets: Iterable[Any] = ()) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if isinstance(secret, str) and len(secret) >= MIN_SECRET_CHARS:
                for form in (secret, secret.upper(), secret.lower()):
                    # Also as it appears inside a JSON string (a quote, backslash or control
                    # character escaped), so an encoded line can be checked in one search.
                    forms.update((form, orjson.dumps(form).decode()[1:-1]))
        self._count = len(forms)
        self._forms = tuple(sorted(forms, key=len, reverse=True))
        self._pattern: re.Pattern[str] | None = (
            re.compile("|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)))
            if forms
            else None
        )

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __repr__(self) -> str:  # never the secrets themselves
        return f"Scrubber({self._count} forms)"

    def scrub(self, text: str) -> str:
        """``text`` with every secret replaced by ``***``."""
        pattern = self._pattern
        if pattern is None or not text:
            return text
        out = pattern.sub(REDACTED, text)
        # A secret containing "***" could re-form around a replacement: repeat until none is
        # left (each round shortens the text, so this ends; one extra search when it matched).
        while out != text and pattern.search(out) is not None:
            text, out = out, pattern.sub(REDACTED, out)
        return out

    def contains_secret(self, text: str) -> bool:
        """Whether ``text`` holds any secret.  A substring test per form: ~0.2 µs each on a log
        line, about half of one search of the compiled alternation."""
        for form in self._forms:  # noqa: SIM110 (a plain loop: no generator per call)
            if form in text:
                return True
        return False

    def scrub_value(self, value: Any) -> Any:
        """A copy of a JSON-like value with every string scrubbed (keys included)."""
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, Mapping):
            return {self.scrub_value(k): self.scrub_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub_value(v) for v in value]
        return value

    def scrub_error(self, exc: GatewayError) -> GatewayError:
        """Scrub ``exc`` in place (message, args, param, code, headers) and return it.

        Run on every error response, so it also makes the text valid Unicode.

        A ``code`` that held a secret, or that is not a plain token (an upstream chooses it), is
        replaced by the error class's own code, so what becomes a header, a log field or a metric
        label is always a short identifier.
        """
        # Undecodable client bytes (a header echoed in a message) arrive as lone surrogates,
        # which no JSON encoder writes: shown escaped instead, so the error still renders.
        exc.message = valid_text(exc.message)
        if exc.param is not None:
            exc.param = valid_text(exc.param)
        if self._pattern is not None:
            exc.message = self.scrub(exc.message)
            if exc.param is not None:
                exc.param = self.scrub(exc.param)
            if exc.headers:
                exc.headers = {k: self.scrub(v) for k, v in exc.headers.items()}
        exc.args = (exc.message,)
        code = exc.code
        if self.contains_secret(code) or _CODE.fullmatch(code) is None:
            exc.code = type(exc).default_code
        if isinstance(exc, ProviderRejected):
            # The upstream's own code and type go out verbatim: only plain tokens, never a key.
            for attr in ("upstream_code", "upstream_type"):
                value = getattr(exc, attr)
                if value is not None and (
                    self.contains_secret(value) or _CODE.fullmatch(value) is None
                ):
                    setattr(exc, attr, None)
        if exc.headers:
            exc.headers = {k: header_value(v) for k, v in exc.headers.items()}
        return exc


#: A scrubber with no secrets (every call returns its argument).
NO_SECRETS: Final = Scrubber()


def url_secrets(url: str | None) -> list[str]:
    """The credentials inside a URL's userinfo (``http://user:KEY@host``), in every form they
    may be echoed: as written, percent-decoded, and as the Basic ``Authorization`` token."""
    if not url or "@" not in url:
        return []
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return []
    out: list[str] = []
    for value in (user, password):
        if value:
            out.extend((value, unquote(value)))
    if user is not None or password is not None:
        pair = f"{unquote(user or '')}:{unquote(password or '')}"
        out.append(base64.b64encode(pair.encode()).decode())
    return out


def mask_url(url: str) -> str:
    """``url`` with its userinfo replaced by ``***`` (for printing configuration)."""
    if "@" not in url or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"{REDACTED}@{host}", parts.path, parts.query, parts.fragment))


def provider_secrets(config: Any) -> list[str]:
    """A provider's own secrets: its ``api_key``, credentials in its ``base_url``, and options
    whose name says secret (``ProviderConfig``; typed ``Any`` to keep this module import-light)."""
    out: list[str] = []
    if isinstance(config.api_key, str):
        out.append(config.api_key)
    out.extend(url_secrets(config.base_url))
    options: Mapping[str, Any] = config.options or {}
    for key, value in options.items():
        if isinstance(value, str) and SECRET_NAME.search(str(key)):
            out.append(value)
    return out


async def scrub_stream(
    chunks: AsyncIterator[dict[str, Any]], scrubber: Scrubber
) -> AsyncIterator[dict[str, Any]]:
    """Relay a provider's stream, scrubbing any ``GatewayError`` it raises; closes it at the end
    (also when the consumer stops early), so the upstream connection is dropped at once."""
    try:
        async for chunk in chunks:
            yield chunk
    except GatewayError as exc:
        scrubber.scrub_error(exc)
        raise
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


# --- output hygiene ----------------------------------------------------------------------------


def header_value(text: str, limit: int = MAX_HEADER_CHARS) -> str:
    """``text`` made safe as a response header value: printable ASCII only (anything else,
    CR, LF and NUL included, is percent-encoded), at most ``limit`` characters.

    aiohttp refuses a header with CR/LF/NUL by dropping the connection, so a client byte
    echoed into a header unchecked turned a request into an empty reply.
    """
    if text.isascii() and text.isprintable() and len(text) <= limit:
        return text
    out = "".join(
        c
        if " " <= c <= "~" and c != "%"
        else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in text
    )
    return out[:limit]


def valid_text(text: str) -> str:
    """``text`` as valid Unicode: lone surrogates (from undecodable bytes) become ``\\udcXX``."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def printable(text: str) -> str:
    """``text`` with control characters (and Unicode line separators) escaped as ``\\xNN``, so
    one log record stays one line whatever a client put in it."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
