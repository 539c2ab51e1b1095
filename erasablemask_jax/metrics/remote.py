"""Client for a black-box HTTP face-compare service (the paper's Table III queries commercial ones).

Protocol (the default mapping; both directions are pluggable):

  POST <url>
  Content-Type: application/json
  {"image1": "<base64 PNG>", "image2": "<base64 PNG>"}

  200 OK
  {"confidence": <float>}          # higher = more likely the same person

Statuses 429 and 5xx, connection failures and timeouts are retried with exponential backoff
(`backoff_s * 2**attempt`, capped at `max_backoff_s`, honouring a numeric `Retry-After`); other 4xx fail at once.
Requests are spaced to at most `max_requests_per_s`. Only the standard library is used (urllib).

A service with another API (form fields, API keys, a score under another name) is adapted by passing
`encode_request(png1, png2) -> (body, headers)` and `decode_response(body) -> float`, plus `headers` for keys.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Iterable, Mapping

import numpy as np
from PIL import Image

from erasablemask_jax.train.writer import to_uint8

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class RemoteCompareError(RuntimeError):
  """The face-compare service failed or answered something that is not a confidence."""


class RemoteTimeoutError(RemoteCompareError):
  """The service did not answer within the timeout, on every attempt."""


def to_png(image: np.ndarray) -> bytes:
  """PNG bytes of one image: uint8 RGB [H, W, 3], or float [H, W, 3] in [-1, 1] (mapped by round((x+1)*127.5))."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected one RGB image [H, W, 3], got shape {image.shape}")
  if image.dtype != np.uint8:
    image = to_uint8(image)
  buf = io.BytesIO()
  Image.fromarray(image, "RGB").save(buf, format="PNG")
  return buf.getvalue()


def json_base64_request(png1: bytes, png2: bytes) -> tuple[bytes, dict[str, str]]:
  """Default request body: `{"image1": b64(png1), "image2": b64(png2)}` as JSON."""
  body = json.dumps({"image1": base64.b64encode(png1).decode("ascii"),
                     "image2": base64.b64encode(png2).decode("ascii")}).encode("utf-8")
  return body, {"Content-Type": "application/json"}


def confidence_response(body: bytes) -> float:
  """Default response parser: the float under `"confidence"` in a JSON object."""
  try:
    value = json.loads(body.decode("utf-8"))["confidence"]
    return float(value)
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise RemoteCompareError(f"response is not JSON with a numeric 'confidence': {body[:200]!r}") from e


class RateLimiter:
  """Spaces calls at least `1 / max_per_s` seconds apart (thread-safe); None or 0 disables it."""

  def __init__(self, max_per_s: float | None, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep):
    self.interval = 1.0 / max_per_s if max_per_s else 0.0
    self._clock, self._sleep = clock, sleep
    self._next = -float("inf")
    self._lock = threading.Lock()

  def acquire(self) -> None:
    """Blocks until the next call may start."""
    with self._lock:
      now = self._clock()
      start = max(now, self._next)
      self._next = start + self.interval
    if start > now:
      self._sleep(start - now)


@dataclasses.dataclass
class RemoteFaceCompare:
  """A face-compare endpoint.

  Attributes:
    url: the endpoint, e.g. "http://127.0.0.1:8000/compare".
    timeout_s: per-request timeout.
    max_retries: retries after the first attempt (so at most `max_retries + 1` requests per pair).
    backoff_s: first retry delay; doubles each retry.
    max_backoff_s: cap on one delay.
    max_requests_per_s: rate limit over all requests of this client (None: unlimited).
    headers: extra HTTP headers (an API key, say).
    encode_request: `(png1, png2) -> (body, headers)`.
    decode_response: `body -> confidence`.
  """
  url: str
  timeout_s: float = 10.0
  max_retries: int = 3
  backoff_s: float = 0.5
  max_backoff_s: float = 8.0
  max_requests_per_s: float | None = 2.0
  headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
  encode_request: Callable[[bytes, bytes], tuple[bytes, dict[str, str]]] = json_base64_request
  decode_response: Callable[[bytes], float] = confidence_response
  sleep: Callable[[float], None] = time.sleep

  def __post_init__(self):
    if not self.url.startswith(("http://", "https://")):
      raise ValueError(f"remote URL must start with http:// or https://, got {self.url!r}")
    self._limiter = RateLimiter(self.max_requests_per_s, sleep=self.sleep)
    self.requests_made = 0

  def compare(self, image1: np.ndarray, image2: np.ndarray) -> float:
    """The service's confidence that two faces (uint8 or [-1, 1] float, [H, W, 3]) are the same person."""
    body, headers = self.encode_request(to_png(image1), to_png(image2))
    headers = {**headers, **self.headers}
    last = "no attempt made"
    for attempt in range(self.max_retries + 1):
      if attempt:
        self.sleep(min(self.max_backoff_s, self.backoff_s * 2**(attempt - 1)))
      self._limiter.acquire()
      self.requests_made += 1
      request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
      try:
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          return self.decode_response(response.read())
      except urllib.error.HTTPError as e:
        detail = e.read()[:200]
        if e.code not in RETRY_STATUSES:
          raise RemoteCompareError(f"{self.url} answered HTTP {e.code} {e.reason}: {detail!r}; check the URL, "
                                   "the request format (encode_request) and any API key") from e
        last = f"HTTP {e.code} {e.reason}"
        retry_after = e.headers.get("Retry-After") if e.headers else None
        if retry_after and retry_after.strip().isdigit():
          self.sleep(min(self.max_backoff_s, float(retry_after)))
      except (socket.timeout, TimeoutError):
        last = "timeout"
      except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
          last = "timeout"
        else:
          last = f"connection failed ({e.reason})"
    attempts = self.max_retries + 1
    if last == "timeout":
      raise RemoteTimeoutError(f"{self.url} did not answer within {self.timeout_s:g} s on {attempts} attempts; "
                               "raise the timeout or check that the service is up")
    raise RemoteCompareError(f"{self.url} failed on all {attempts} attempts (last: {last}); "
                             "check that the service is up, or lower the request rate")

  def compare_many(self, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Confidences for a sequence of image pairs, in order (float64 [N])."""
    return np.asarray([self.compare(a, b) for a, b in pairs], np.float64)
