"""Client for a black-box HTTP face-compare service (the paper's Table III queries commercial ones).

Protocol (the default mapping; both directions are pluggable):

  POST <url>
  Content-Type: application/json
  {"image1": "<base64 PNG>", "image2": "<base64 PNG>"}

  200 OK
  {"confidence": <float>}          # higher = more likely the same person

Statuses 429 and 5xx, connection failures, connections dropped before the answer and timeouts are retried with
exponential backoff (`backoff_s * 2**attempt`, capped at `max_backoff_s`, honouring a numeric `Retry-After`); other
4xx fail at once. Requests are spaced to at most `max_requests_per_s`. Only the standard library is used (urllib).

A service with another API (form fields, API keys, a score under another name) is adapted by passing
`encode_request(png1, png2) -> (body, headers)` and `decode_response(body) -> float | Comparison`, plus `headers` for
keys, `retry_if(status, body)` for its rate-limit answers and `describe_error(status, body)` for its error codes.

Presets (`make_client(api, url)`, `erasablemask evaluate --remote-api NAME`):

- `json`: the protocol above (`compare_server` speaks it).
- `facepp`: Face++'s compare endpoint (https://api-us.faceplusplus.com/facepp/v3/compare by default). A multipart
  form with `api_key`, `api_secret`, `image_base64_1`, `image_base64_2`; the answer's `confidence` (0-100) and
  `thresholds` at FAR 1e-3 / 1e-4 / 1e-5 (`"1e-3"`, `"1e-4"`, `"1e-5"`). The keys come from the environment
  (`FACEPP_API_KEY`, `FACEPP_API_SECRET`) and appear in no message, log or repr. HTTP 403 `CONCURRENCY_LIMIT_EXCEEDED`
  (its rate limit) is backed off and retried; other error codes are one clear error. A pair where Face++ finds no face
  scores NaN (Face++ needs images of 48 to 4096 px and faces of at least 150 px).
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import math
import os
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Iterable, Mapping

import numpy as np
from PIL import Image

from erasablemask_jax.image_io import to_uint8

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class RemoteCompareError(RuntimeError):
  """The face-compare service failed or answered something that is not a confidence."""


class RemoteTimeoutError(RemoteCompareError):
  """The service did not answer within the timeout, on every attempt."""


class MissingCredentialsError(RemoteCompareError):
  """A preset's API keys are not in the environment; the message names the variables."""


@dataclasses.dataclass(frozen=True)
class Comparison:
  """What a `decode_response` may return instead of a bare confidence: the service's own thresholds too."""

  confidence: float
  thresholds: Mapping[str, float] | None = None


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


def default_retry_if(status: int, body: bytes) -> bool:
  """429 and 5xx are worth another try; other statuses are not."""
  del body
  return status in RETRY_STATUSES


def default_describe_error(status: int, body: bytes) -> str:
  return f"answered HTTP {status}: {body[:200]!r}; check the URL, the request format (encode_request) and any API key"


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
    decode_response: `body -> confidence` (a float, NaN for "no face found", or a `Comparison`).
    retry_if: `(status, body) -> bool`: whether an HTTP error answer is retried (a rate limit, a server error).
    describe_error: `(status, body) -> str`: the message for an error answer that is not retried.
  """
  url: str
  timeout_s: float = 10.0
  max_retries: int = 3
  backoff_s: float = 0.5
  max_backoff_s: float = 8.0
  max_requests_per_s: float | None = 2.0
  headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
  encode_request: Callable[[bytes, bytes], tuple[bytes, dict[str, str]]] = json_base64_request
  decode_response: Callable[[bytes], float | Comparison] = confidence_response
  retry_if: Callable[[int, bytes], bool] = default_retry_if
  describe_error: Callable[[int, bytes], str] = default_describe_error
  sleep: Callable[[float], None] = time.sleep

  def __post_init__(self):
    if not self.url.startswith(("http://", "https://")):
      raise ValueError(f"remote URL must start with http:// or https://, got {self.url!r}")
    self._limiter = RateLimiter(self.max_requests_per_s, sleep=self.sleep)
    self.requests_made = 0
    self.thresholds: dict[str, float] | None = None  # the service's own, from its last answer that had them

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
          answer = self.decode_response(response.read())
      except urllib.error.HTTPError as e:
        detail = e.read()
        if not self.retry_if(e.code, detail):
          raise RemoteCompareError(f"{self.url} {self.describe_error(e.code, detail)}") from None
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
      except (http.client.HTTPException, ConnectionError) as e:  # dropped mid-answer: as a 5xx, try again
        last = f"connection dropped ({type(e).__name__}{': ' + str(e) if str(e) else ''})"
      else:
        if isinstance(answer, Comparison):
          if answer.thresholds:
            self.thresholds = dict(answer.thresholds)
          return answer.confidence
        return answer
    attempts = self.max_retries + 1
    if last == "timeout":
      raise RemoteTimeoutError(f"{self.url} did not answer within {self.timeout_s:g} s on {attempts} attempts; "
                               "raise the timeout or check that the service is up")
    raise RemoteCompareError(f"{self.url} failed on all {attempts} attempts (last: {last}); "
                             "check that the service is up, or lower the request rate")

  def compare_many(self, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Confidences for a sequence of image pairs, in order (float64 [N])."""
    return np.asarray([self.compare(a, b) for a, b in pairs], np.float64)


# ---------------------------------------------------------------------------------------------------------------------
# Face++: the documented v3 Compare API (form fields, answer and error codes as its API reference lists them).

FACEPP_URL = "https://api-us.faceplusplus.com/facepp/v3/compare"
FACEPP_KEY_ENV, FACEPP_SECRET_ENV = "FACEPP_API_KEY", "FACEPP_API_SECRET"
FACEPP_THRESHOLD_KEYS = ("1e-3", "1e-4", "1e-5")
FACEPP_RATE_LIMITED = "CONCURRENCY_LIMIT_EXCEEDED"
_FACEPP_ADVICE = {
    "AUTHENTICATION_ERROR": f"the API key and secret do not match: check {FACEPP_KEY_ENV} and {FACEPP_SECRET_ENV}",
    "AUTHORIZATION_ERROR": "this API key may not call compare (denied, or the account balance is spent)",
    "INVALID_IMAGE_SIZE": "Face++ takes images of 48x48 to 4096x4096 pixels: evaluate at another image size",
    "IMAGE_FILE_TOO_LARGE": "Face++ takes image files of at most 2 MB",
    "IMAGE_ERROR_UNSUPPORTED_FORMAT": "Face++ could not decode the PNG",
    "BAD_ARGUMENTS": "the request was malformed",
    "MISSING_ARGUMENTS": "the request was malformed",
    "API_NOT_FOUND": "check the URL (--remote): it should end in /facepp/v3/compare",
}


def multipart_form(fields: Mapping[str, str]) -> tuple[bytes, dict[str, str]]:
  """`multipart/form-data` body and Content-Type header for text fields (what `curl -F name=value` sends)."""
  boundary = f"erasablemask-{secrets.token_hex(16)}"
  parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
           for name, value in fields.items()]
  body = ("".join(parts) + f"--{boundary}--\r\n").encode("utf-8")
  return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class FaceppRequest:
  """`encode_request` for Face++: the two PNGs base64-encoded in a form with the keys; its repr hides the keys."""

  def __init__(self, api_key: str, api_secret: str):
    self._fields = {"api_key": api_key, "api_secret": api_secret}

  def __repr__(self) -> str:
    return "FaceppRequest(api_key=<hidden>, api_secret=<hidden>)"

  def __call__(self, png1: bytes, png2: bytes) -> tuple[bytes, dict[str, str]]:
    return multipart_form({**self._fields, "image_base64_1": base64.b64encode(png1).decode("ascii"),
                           "image_base64_2": base64.b64encode(png2).decode("ascii")})


def _facepp_error_message(body: bytes) -> str:
  try:
    payload = json.loads(body.decode("utf-8"))
    return str(payload["error_message"]) if isinstance(payload, dict) else ""
  except (ValueError, KeyError, UnicodeDecodeError):
    return ""


def facepp_response(body: bytes) -> Comparison:
  """Face++'s answer -> `Comparison(confidence, thresholds)`; NaN confidence when it found no face in an image."""
  try:
    payload = json.loads(body.decode("utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise RemoteCompareError(f"Face++ answered something that is not JSON: {body[:200]!r}") from e
  if not isinstance(payload, dict):
    raise RemoteCompareError(f"Face++ answered {body[:200]!r}, not a JSON object")
  if "error_message" in payload:
    raise RemoteCompareError(f"Face++ answered {payload['error_message']}")
  if "confidence" not in payload:
    if payload.get("faces1") == [] or payload.get("faces2") == []:
      return Comparison(math.nan)  # Face++ found no face to compare: documented, not an error
    raise RemoteCompareError(f"Face++ answered without a confidence: {body[:200]!r}")
  try:
    thresholds = {k: float(payload["thresholds"][k]) for k in FACEPP_THRESHOLD_KEYS} if "thresholds" in payload else None
    return Comparison(float(payload["confidence"]), thresholds)
  except (KeyError, TypeError, ValueError) as e:
    raise RemoteCompareError(f"Face++ answered a malformed confidence or thresholds: {body[:200]!r}") from e


def facepp_retry_if(status: int, body: bytes) -> bool:
  """Face++ signals its rate limit as HTTP 403 CONCURRENCY_LIMIT_EXCEEDED: back off and retry, like 429 and 5xx."""
  return default_retry_if(status, body) or (status == 403 and _facepp_error_message(body) == FACEPP_RATE_LIMITED)


def facepp_describe_error(status: int, body: bytes) -> str:
  message = _facepp_error_message(body) or body[:200].decode("utf-8", "replace").strip()
  code = message.split(":")[0].strip()
  advice = _FACEPP_ADVICE.get(code, "see the Face++ compare API's error codes")
  return f"(Face++) answered HTTP {status} {message}: {advice}"


API_PRESETS = ("json", "facepp")


def make_client(api: str = "json", url: str | None = None, *, environ: Mapping[str, str] | None = None,
                **kwargs) -> RemoteFaceCompare:
  """A `RemoteFaceCompare` for a preset of `API_PRESETS` (module docstring); `kwargs` go to the client.

  Raises:
    ValueError: an unknown preset, or `json` without a URL.
    MissingCredentialsError: `facepp` without FACEPP_API_KEY / FACEPP_API_SECRET in `environ` (default os.environ).
  """
  environ = os.environ if environ is None else environ
  if api == "json":
    if not url:
      raise ValueError("--remote-api json needs the endpoint's URL (--remote URL)")
    return RemoteFaceCompare(url, **kwargs)
  if api == "facepp":
    missing = [k for k in (FACEPP_KEY_ENV, FACEPP_SECRET_ENV) if not environ.get(k)]
    if missing:
      raise MissingCredentialsError(f"--remote-api facepp reads its keys from the environment: set "
                                    f"{' and '.join(missing)} (from the Face++ console)")
    return RemoteFaceCompare(url or FACEPP_URL, encode_request=FaceppRequest(environ[FACEPP_KEY_ENV],
                                                                             environ[FACEPP_SECRET_ENV]),
                             decode_response=facepp_response, retry_if=facepp_retry_if,
                             describe_error=facepp_describe_error, **kwargs)
  raise ValueError(f"unknown remote API {api!r}; choose one of {', '.join(API_PRESETS)}")
