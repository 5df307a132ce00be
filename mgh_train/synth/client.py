"""One OpenAI-compatible chat client per run: structured output with fallback, retries, token usage.

:class:`ChatClient` wraps a single ``openai.AsyncOpenAI`` (its own retries off: we retry here, so
that a 429's ``retry-after`` is honoured and every failure ends as a :class:`RequestFailed` with a
reason instead of an exception out of the run).

Structured output, tried in this order and lowered for the whole run, one step at a time, when
a server refuses a format (an error naming ``response_format`` or ``json_schema``, whatever its
status; see :func:`_refuses_format`) (:data:`RESPONSE_FORMATS`):

1. ``json_schema``: ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
   (OpenAI, vLLM, SGLang, llama.cpp's own server);
2. ``json_object_schema``: ``{"type": "json_object", "schema": ...}``, which llama-cpp-python's
   server grammar-constrains to the schema;
3. ``json_object``: JSON mode without a schema;
4. ``text``: no ``response_format``; the JSON is extracted from the reply text.

Whatever the format, the caller parses the reply text (:func:`validate.extract_json`), so a
server that ignores the format costs nothing but rejects.

Retried (exponential backoff with jitter, or the server's ``retry-after`` / ``retry-after-ms``
when it sends one, at most ``max_retries`` times): HTTP 408, 409, 429 and 5xx, dropped or
refused connections, timeouts, and 200 replies whose body is not a chat completion (truncated,
HTML, not JSON); when they run out, :class:`RequestFailed` is ``transient``. Not retried: other
4xx (a bad request fails the same way again; but a 400 asking for ``max_completion_tokens``
instead of ``max_tokens``, as OpenAI's reasoning models send, switches the name for the run);
401, 403 and 404 end the run
(:class:`ServerRefused`): no request can succeed with a bad key, URL or model. So does a
connection that cannot be made (refused, an unknown host) before the server has answered once:
nothing listens at the URL, and retrying every request with backoff would only take minutes to
say so. Once the server has answered, a refused connection is retried (a restart, a blip).

The API key comes from the caller or ``OPENAI_API_KEY`` and is never put in a message, a log or
a file (server text is scrubbed of it, and of anything shaped like a key, in case a server echoes
it); local servers that need no key get a placeholder. OpenAI's own API (no ``base_url`` and no
``OPENAI_BASE_URL``) without a key is refused at once with a ValueError.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

RESPONSE_FORMATS = ("json_schema", "json_object_schema", "json_object", "text")
NO_KEY_PLACEHOLDER = "no-key"  # what a local server sees when OPENAI_API_KEY is unset

RETRYABLE_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = {
    401: "the API key was refused (set OPENAI_API_KEY)",
    403: "the API key may not use this model",
    404: "no such endpoint or model (check --base-url and --model)",
}


class RequestFailed(Exception):
    """A request that could not be completed; the message says why.

    ``transient`` is True when it failed on retryable errors (the server down, overloaded, timing
    out): a later run may well succeed, so the unit is not done. False for a request the server
    will refuse again (a 400 that is not about the format).
    """

    def __init__(self, reason: str, *, transient: bool):
        super().__init__(reason)
        self.transient = transient


class ServerRefused(RuntimeError):
    """The server refuses every request (bad key, URL or model): the run stops."""


@dataclass
class Usage:
    """Tokens and requests of the run so far, from the ``usage`` of each reply."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Reply:
    """A completed request: the reply text, how it was asked for, and its token count."""

    text: str
    response_format: str
    finish_reason: str | None
    tokens: int


@dataclass
class RetryPolicy:
    """Backoff for retryable failures: ``min(cap, base * 2**attempt)`` with jitter, or the server's wait.

    A ``retry-after`` longer than ``max_server_wait`` seconds is capped to it (a misbehaving proxy
    must not park the run for an hour).
    """

    max_retries: int = 6
    base: float = 0.5
    cap: float = 30.0
    max_server_wait: float = 120.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, server_wait: float | None) -> float:
        if server_wait is not None:
            return min(max(server_wait, 0.0), self.max_server_wait)
        return min(self.cap, self.base * 2**attempt) * (0.5 + 0.5 * self.rng.random())


def retry_after_seconds(headers) -> float | None:
    """The wait a response asks for: ``retry-after-ms``, or ``retry-after`` in seconds or as an HTTP date."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return float(milliseconds) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def response_format_for(mode: str, schema: dict, name: str) -> dict | None:
    """The ``response_format`` argument of ``mode`` (None for ``text``)."""
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": False}}
    if mode == "json_object_schema":
        return {"type": "json_object", "schema": schema}
    if mode == "json_object":
        return {"type": "json_object"}
    if mode == "text":
        return None
    raise ValueError(f"response_format: expected auto or one of {', '.join(RESPONSE_FORMATS)}, got {mode!r}")


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class ChatClient:
    """``ChatClient(base_url=..., model=...)``: JSON-answer chat requests to one OpenAI-compatible server.

    Args:
        base_url: the server's API root, e.g. ``http://127.0.0.1:8000/v1``; None for OpenAI's.
        model: the model name sent with every request.
        api_key: the key; default ``OPENAI_API_KEY``, or a placeholder when that is unset.
        timeout: seconds per request (connect, read and write).
        retry: the :class:`RetryPolicy`.
        response_format: ``"auto"`` (start at ``json_schema`` and fall back) or one of
            :data:`RESPONSE_FORMATS` to start there (lower ones are still fallen back to).
        temperature, top_p, max_tokens: sampling settings sent with every request.
        sleep: the coroutine used to wait between retries (tests pass a recorder).
        log: where notices go (a format fallback, say); default: standard error via ``print``.
    """

    def __init__(
        self,
        *,
        base_url: str | None,
        model: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        response_format: str = "auto",
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 1024,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        log: Callable[[str], None] | None = None,
    ):
        import openai

        _check_settings(model, timeout, max_tokens, response_format)
        key = _api_key(api_key, base_url)
        self._secrets = [key] if key != NO_KEY_PLACEHOLDER else []
        self._openai = openai
        self._client = openai.AsyncOpenAI(base_url=base_url, timeout=timeout, max_retries=0, api_key=key)
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or str(self._client.base_url)
        self.model, self.retry = model, retry or RetryPolicy()
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        self.format_index = 0 if response_format == "auto" else RESPONSE_FORMATS.index(response_format)
        self.tokens_parameter = "max_tokens"  # or max_completion_tokens, once a server asks for it
        self.usage = Usage()
        self.answered = False  # whether the server has sent any HTTP response in this run
        self._sleep = sleep
        self._log = log or (lambda message: print(message, flush=True))

    @property
    def response_format(self) -> str:
        """The structured-output mode requests use now."""
        return RESPONSE_FORMATS[self.format_index]

    def _lower_format(self, tried: int, error) -> bool:
        """Fall back below format ``tried`` (once per run); False if there is nothing lower."""
        if tried >= len(RESPONSE_FORMATS) - 1:
            return False
        if self.format_index == tried:
            self.format_index = tried + 1
            self._log(
                f"synth: the server refused response_format {RESPONSE_FORMATS[tried]} "
                f"(HTTP {error.status_code}: {self._clean(error.message, 120)}); "
                f"using {RESPONSE_FORMATS[tried + 1]} from now on"
            )
        return True

    async def complete(self, messages: list[dict], *, schema: dict, name: str, seed: int | None = None) -> Reply:
        """Send one chat request asking for JSON matching ``schema``; the reply text.

        Raises :class:`RequestFailed` (with the reason) or :class:`ServerRefused`; nothing else.
        Server text in either is shortened and has the key cut out.
        """
        openai = self._openai
        attempt, lowered, renamed = 0, False, False
        while True:
            mode = self.format_index
            arguments = self._arguments(RESPONSE_FORMATS[mode], messages, schema, name, seed)
            self.usage.requests += 1
            server_wait = None
            try:
                completion = await self._client.chat.completions.create(**arguments)
                self.answered = True
                return self._reply(completion, RESPONSE_FORMATS[mode])
            except openai.APIStatusError as error:
                self.answered = True
                # Before the fatal statuses: some gateways answer an unservable format with a 404.
                if not lowered and mode < len(RESPONSE_FORMATS) - 1 and _refuses_format(error):
                    lowered = True  # one step per request, so one odd error cannot drop every format
                    self._lower_format(mode, error)
                    continue  # not a retry: the request was never served
                if not renamed and error.status_code == 400 and self._wants_max_completion_tokens(error):
                    renamed = True
                    continue  # not a retry: the request was never served
                reason, server_wait = self._retryable_status(error)
            except openai.APITimeoutError:
                reason = "timed out"
            except openai.APIConnectionError as error:
                reason = self._retryable_connection(error)
            except (json.JSONDecodeError, _MalformedReply) as error:  # a 200 whose body is no chat completion
                reason = f"malformed response body ({self._clean(error, 100)})"
            if attempt >= self.retry.max_retries:
                raise RequestFailed(f"{reason}; gave up after {attempt + 1} attempts", transient=True)
            delay = self.retry.delay(attempt, server_wait)
            attempt += 1
            self.usage.retries += 1
            await self._sleep(delay)

    def _arguments(self, mode: str, messages: list[dict], schema: dict, name: str, seed: int | None) -> dict:
        """The keyword arguments of one ``chat.completions.create`` asking for ``mode``."""
        arguments = dict(model=self.model, messages=messages, **self.sampling)
        if self.tokens_parameter != "max_tokens":
            arguments[self.tokens_parameter] = arguments.pop("max_tokens")
        response_format = response_format_for(mode, schema, name)
        if response_format is not None:
            arguments["response_format"] = response_format
        if seed is not None:
            arguments["seed"] = seed
        return arguments

    def _retryable_status(self, error) -> tuple[str, float | None]:
        """The reason and the server's wait for an HTTP error worth retrying; raises for any other."""
        status = error.status_code
        if status in FATAL_STATUS:
            raise ServerRefused(
                f"HTTP {status} from the server: {FATAL_STATUS[status]} ({self._clean(error.message, 160)})"
            ) from None
        if status not in RETRYABLE_STATUS and status < 500:
            raise RequestFailed(f"HTTP {status}: {self._clean(error.message)}", transient=False) from None
        return f"HTTP {status}: {self._clean(error.message)}", retry_after_seconds(error.response.headers)

    def _retryable_connection(self, error) -> str:
        """The reason for a failed connection; ServerRefused when nothing has ever answered at the URL."""
        cause = error.__cause__
        if not self.answered and _cannot_connect(cause):
            raise ServerRefused(
                f"cannot connect to {self.base_url} ({self._clean(cause, 160)}): "
                "nothing answers there; start the server, or check --base-url"
            ) from None
        return f"connection failed ({type(cause).__name__ if cause else 'no response'})"

    def _reply(self, completion, mode: str) -> Reply:
        choices = getattr(completion, "choices", None)
        if not choices:
            raise _MalformedReply(f"no choices in {type(completion).__name__}")
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
        usage = getattr(completion, "usage", None)
        tokens = 0
        if usage is not None:
            prompt, done = (_count(getattr(usage, name, 0)) for name in ("prompt_tokens", "completion_tokens"))
            self.usage.prompt_tokens += prompt
            self.usage.completion_tokens += done
            tokens = prompt + done
        return Reply(
            text=text if isinstance(text, str) else "",
            response_format=mode,
            finish_reason=getattr(choices[0], "finish_reason", None),
            tokens=tokens,
        )

    def _wants_max_completion_tokens(self, error) -> bool:
        """A 400 asking for ``max_completion_tokens`` (OpenAI's reasoning models): switch for the run, once."""
        if "max_completion_tokens" not in _error_text(error):
            return False
        if self.tokens_parameter == "max_tokens":  # concurrent requests sent before the switch find it done
            self.tokens_parameter = "max_completion_tokens"
            self._log("synth: the server wants max_completion_tokens instead of max_tokens; using it from now on")
        return True

    def _clean(self, text, limit: int = 200) -> str:
        """Server text for a message or a file: shortened, and with the key cut out should it echo it."""
        text = str(text)
        for secret in self._secrets:
            text = text.replace(secret, "[key]")
        return _short(_KEY_LIKE.sub("[key]", text), limit)

    async def close(self) -> None:
        await self._client.close()


def _check_settings(model, timeout, max_tokens, response_format) -> None:
    """ValueError naming the first of :class:`ChatClient`'s settings that is not usable."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model: expected the model name the server serves")
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens: expected a positive number, got {max_tokens}")
    if response_format != "auto":
        response_format_for(response_format, {}, "check")  # raises on an unknown name


def _api_key(api_key: str | None, base_url: str | None) -> str:
    """The key to send: ``api_key``, else ``OPENAI_API_KEY``, else a placeholder (a local server needs
    none); ValueError for OpenAI's own API without a key, and for a key no HTTP header can carry."""
    if not (api_key or os.environ.get("OPENAI_API_KEY")) and not (base_url or os.environ.get("OPENAI_BASE_URL")):
        raise ValueError(
            "api key: OPENAI_API_KEY is not set, and OpenAI's API needs it; export OPENAI_API_KEY=..., "
            "or pass --base-url for a server that needs no key"
        )
    key = api_key or os.environ.get("OPENAI_API_KEY") or NO_KEY_PLACEHOLDER
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        # It goes into an HTTP header; say what is wrong without showing it.
        raise ValueError(
            f"api key: OPENAI_API_KEY must be printable ASCII without spaces ({len(key)} characters, not shown)"
        )
    return key


_KEY_LIKE = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-]{8,}")


def _count(value) -> int:
    """A token count from ``usage``: a non-negative int, or 0 for anything else a server sends."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _cannot_connect(cause) -> bool:
    """Whether an exception under openai's APIConnectionError is a connection never made (refused,
    an unknown host, no route), as opposed to one dropped mid-request or a timeout. The HTTP
    library's ``ConnectError`` is matched by name: openai has used httpx and httpx2."""
    for _ in range(8):  # down the chain of causes, a few links at most
        if cause is None:
            return False
        if isinstance(cause, (ConnectionRefusedError, socket.gaierror)) or type(cause).__name__ == "ConnectError":
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _error_text(error) -> str:
    """An error reply's message and body, as one string to search."""
    try:
        body = json.dumps(error.body) if error.body is not None else ""
    except (TypeError, ValueError):
        body = str(error.body)
    return f"{error.message} {body}"


def _refuses_format(error) -> bool:
    """Whether an error reply refuses the ``response_format`` (so a lower one may be served).

    Any 4xx/5xx whose message or body names ``response_format`` or ``json_schema`` counts:
    OpenAI's 400 "'response_format' of type 'json_schema' is not supported with this model",
    a gateway's 404 "No endpoints found that support ... response_format", and llama-cpp-python's
    HTTP 500 validation error ("('body', 'response_format', 'type') Input should be 'text' or
    'json_object'"). So does a 400/422 with no text at all. Anything else (a too-long prompt, a
    body the server could not parse) does not lower the format.
    """
    text = _error_text(error).lower()
    if getattr(error, "param", None) == "response_format" or "response_format" in text or "json_schema" in text:
        return True
    return error.status_code in (400, 422) and not (str(error.body or "").strip())


class _MalformedReply(Exception):
    """A successful HTTP reply that is not a chat completion."""


__all__ = [
    "ChatClient",
    "RESPONSE_FORMATS",
    "Reply",
    "RequestFailed",
    "RetryPolicy",
    "ServerRefused",
    "Usage",
    "response_format_for",
    "retry_after_seconds",
]
