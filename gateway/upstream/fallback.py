"""The fallback client: aiohttp's ClientSession behind the same interface (``client: aiohttp``).

Kept for comparison and as a way back should an upstream need something the
lean client does not do. Configured as the gateway always configured it: no
cookies, no redirects, no decompression, no headers added, no read timer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.config import UpstreamSettings
from gateway.upstream.answer import Body, InvalidAnswer, UpstreamAnswer, UpstreamError
from gateway.upstream.client import tls_context

__all__ = ["AiohttpAnswer", "AiohttpClient"]

# aiohttp adds Accept, Accept-Encoding, User-Agent and a Content-Type the client
# never sent unless told to skip them; an added Accept-Encoding would even make
# the upstream compress answers the client cannot read (nothing is decompressed
# here). Skipping them through ``skip_auto_headers`` costs a sort, a copy and two
# multidicts per request, so this request class skips all four, always.
_NO_AUTO_HEADERS: CIMultiDict[None] = CIMultiDict(
    (name, None) for name in ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
)


class _PassThroughRequest(aiohttp.ClientRequest):
    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _NO_AUTO_HEADERS


@functools.lru_cache(maxsize=4096)
def _cached_url(text: str) -> URL:
    return URL(text, encoded=True)


def _url(text: str) -> URL:
    """Parsing a URL costs more than the rest of the header work: query-less ones are kept."""
    return URL(text, encoded=True) if "?" in text else _cached_url(text)


def _failure(exc: aiohttp.ClientError) -> Exception:
    """What an aiohttp error means here: the body source's own exception, or an UpstreamError."""
    cause = exc.__cause__
    if isinstance(cause, HttpProcessingError):
        error: UpstreamError = InvalidAnswer(str(cause))
        error.__cause__ = cause
        return error
    if isinstance(cause, Exception) and not isinstance(
        cause, aiohttp.ClientError | OSError | UpstreamError
    ):
        return cause
    error = UpstreamError(str(exc))
    error.__cause__ = exc
    return error


class AiohttpAnswer:
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def reason(self) -> str:
        return self._response.reason or ""

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._response.headers

    @property
    def content_length(self) -> int | None:
        return self._response.content_length

    async def read_chunk(self) -> bytes:
        try:
            return await self._response.content.readany()
        except (aiohttp.ClientError, OSError, HttpProcessingError) as exc:
            raise UpstreamError("the upstream broke off its answer") from exc

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        self._response.close()


class AiohttpClient:
    def __init__(self, settings: UpstreamSettings) -> None:
        self._settings = settings
        self._base = settings.url
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        s = self._settings
        tls = tls_context(s) if s.url.startswith("https://") else None
        connector = aiohttp.TCPConnector(
            limit=s.max_connections,
            limit_per_host=s.max_connections,
            # Close idle connections before the upstream does, so a request
            # is never written into a socket the upstream is closing.
            keepalive_timeout=s.keepalive_seconds,
            ttl_dns_cache=60,
            ssl=tls if tls is not None else True,
        )
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            # No sock_read: it arms a timer per response (and moves it per
            # chunk); the pipeline's Deadlines keep the read limits instead.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_seconds),
            request_class=_PassThroughRequest,
            raise_for_status=False,
        )

    async def request(
        self, method: str, target: str, headers: Mapping[str, str], body: Body
    ) -> UpstreamAnswer:
        session = self._session
        if session is None:
            session = self._session = self._open()
        try:
            response = await session.request(
                method,
                _url(self._base + target),
                headers=headers,
                data=body,
                allow_redirects=False,
            )
        except TimeoutError:
            raise  # aiohttp's connect timeout (a ClientError too)
        except aiohttp.ClientError as exc:
            raise _failure(exc) from None
        except HttpProcessingError as exc:
            # aiohttp's parser refused the answer; not a ClientError, so before this
            # adapter it escaped the forward stage as a 500.
            raise InvalidAnswer(str(exc)) from exc
        except OSError as exc:
            raise UpstreamError(str(exc)) from exc
        return AiohttpAnswer(response)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
