"""The HTTP face-compare client against real local servers on 127.0.0.1 (reference server, flaky, slow, Face++)."""

import base64
import contextlib
import email.parser
import http.server
import io
import json
import logging
import socket
import struct
import threading
import time
import urllib.request
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from erasablemask_jax.metrics import compare_server
from erasablemask_jax.metrics import remote


class TinyFR(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), name="conv1")(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), name="conv2")(x))
    return nn.Dense(16, name="fc")(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def tiny_embed():
  """uint8 [N, H, W, 3] -> [N, 16] with a random tiny Flax net (numpy-drawn weights: no RNG compile)."""
  model = TinyFR()
  rng = np.random.default_rng(0)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32), abstract)
  apply = jax.jit(model.apply)
  return lambda images: np.asarray(apply(variables, jnp.asarray(images, jnp.float32) / 127.5 - 1.0))


@contextlib.contextmanager
def _serving(server):
  thread = compare_server.start_in_thread(server)
  try:
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}/compare"
  finally:
    server.shutdown()
    server.server_close()
    thread.join(5)


def _scripted_server(script):
  """A server answering POSTs from `script`: a list of (status, delay_s) consumed in order, then 200s.

  Status "drop" closes the connection without an answer (a proxy or server that dies mid-request).
  """
  script = list(script)
  lock = threading.Lock()

  class Handler(http.server.BaseHTTPRequestHandler):

    def log_message(self, *args):
      del args

    def do_POST(self):  # pylint: disable=invalid-name
      self.rfile.read(int(self.headers.get("Content-Length", 0)))
      with lock:
        status, delay = script.pop(0) if script else (200, 0.0)
      time.sleep(delay)
      if status == "drop":
        self.close_connection = True
        return
      body = json.dumps({"confidence": 0.5} if status == 200 else {"error": "scripted"}).encode()
      try:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
      except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
        pass

  return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)


def _faces(n, seed=0, size=32):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_reference_server_scores_equal_the_direct_cosine(tiny_embed):
  a, b = _faces(3, 0), _faces(3, 1)
  b[0] = a[0]  # one identical pair: cosine 1
  with _serving(compare_server.make_server(tiny_embed, input_size=(32, 32))) as url:
    client = remote.RemoteFaceCompare(url, timeout_s=30, max_requests_per_s=None)
    got = client.compare_many(zip(a, b))
    # float [-1, 1] input is sent as the same uint8 PNG
    assert client.compare(a[1].astype(np.float32) / 127.5 - 1.0, b[1]) == pytest.approx(got[1], abs=1e-6)
  e1, e2 = tiny_embed(a).astype(np.float64), tiny_embed(b).astype(np.float64)
  want = np.sum(e1 * e2, 1) / np.linalg.norm(e1, axis=1) / np.linalg.norm(e2, axis=1)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert got[0] == pytest.approx(1.0, abs=1e-5)
  assert len(set(np.round(got, 4))) == 3


def test_reference_server_rejects_malformed_requests(tiny_embed):
  with _serving(compare_server.make_server(tiny_embed, input_size=(32, 32))) as url:
    request = urllib.request.Request(url, data=b'{"image1": "not base64!"}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
      urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 400
    client = remote.RemoteFaceCompare(url.replace("/compare", "/nope"), max_retries=2, max_requests_per_s=None)
    with pytest.raises(remote.RemoteCompareError, match="HTTP 404"):
      client.compare(_faces(1)[0], _faces(1)[0])
    assert client.requests_made == 1  # a 4xx is not retried


def test_retries_injected_503s_with_exponential_backoff():
  delays = []
  with _serving(_scripted_server([(503, 0.0), (503, 0.0)])) as url:
    client = remote.RemoteFaceCompare(url, backoff_s=0.01, max_retries=3, max_requests_per_s=None,
                                      sleep=lambda s: (delays.append(s), time.sleep(s)))
    assert client.compare(_faces(1)[0], _faces(1)[0]) == 0.5
  assert client.requests_made == 3
  assert delays == [0.01, 0.02]
  with _serving(_scripted_server([(503, 0.0)] * 5)) as url:
    client = remote.RemoteFaceCompare(url, backoff_s=0.01, max_retries=1, max_requests_per_s=None)
    with pytest.raises(remote.RemoteCompareError, match=r"all 2 attempts \(last: HTTP 503"):
      client.compare(_faces(1)[0], _faces(1)[0])
    assert client.requests_made == 2


def test_timeout_raises_a_clear_error():
  with _serving(_scripted_server([(200, 2.0), (200, 2.0)])) as url:
    client = remote.RemoteFaceCompare(url, timeout_s=0.2, max_retries=1, backoff_s=0.01, max_requests_per_s=None)
    start = time.monotonic()
    with pytest.raises(remote.RemoteTimeoutError, match=r"did not answer within 0.2 s on 2 attempts"):
      client.compare(_faces(1)[0], _faces(1)[0])
    assert time.monotonic() - start < 1.5


def test_connection_refused_is_reported():
  server = _scripted_server([])
  url = f"http://127.0.0.1:{server.server_address[1]}/compare"
  server.server_close()  # nothing listens there now
  client = remote.RemoteFaceCompare(url, max_retries=1, backoff_s=0.01, max_requests_per_s=None)
  with pytest.raises(remote.RemoteCompareError, match="connection failed"):
    client.compare(_faces(1)[0], _faces(1)[0])


def test_rate_limit_is_respected():
  with _serving(_scripted_server([])) as url:
    client = remote.RemoteFaceCompare(url, max_requests_per_s=20.0)
    faces = _faces(6)
    start = time.monotonic()
    client.compare_many(zip(faces, faces))
    elapsed = time.monotonic() - start
  assert elapsed >= 5 / 20.0 - 1e-3  # 6 requests: 5 full intervals


def test_rate_limiter_spacing_with_a_fake_clock():
  now = [0.0]
  sleeps = []
  limiter = remote.RateLimiter(4.0, clock=lambda: now[0], sleep=lambda s: (sleeps.append(s), now.__setitem__(0, now[0] + s)))
  for _ in range(4):
    limiter.acquire()
  assert sleeps == pytest.approx([0.25, 0.25, 0.25])
  now[0] += 10.0  # idle time does not bank a burst beyond the next slot
  limiter.acquire()
  limiter.acquire()
  assert sleeps[-1] == pytest.approx(0.25)


def test_pluggable_request_and_response_mapping():
  seen = {}

  class Handler(http.server.BaseHTTPRequestHandler):

    def log_message(self, *args):
      del args

    def do_POST(self):  # pylint: disable=invalid-name
      seen["key"] = self.headers.get("X-Api-Key")
      seen["type"] = self.headers.get("Content-Type")
      self.rfile.read(int(self.headers.get("Content-Length", 0)))
      body = b"score=73.5"
      self.send_response(200)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

  with _serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
    client = remote.RemoteFaceCompare(
        url, headers={"X-Api-Key": "k"}, max_requests_per_s=None,
        encode_request=lambda p1, p2: (p1 + p2, {"Content-Type": "application/octet-stream"}),
        decode_response=lambda body: float(body.split(b"=")[1]))
    assert client.compare(_faces(1)[0], _faces(1)[0]) == 73.5
  assert seen == {"key": "k", "type": "application/octet-stream"}
  with pytest.raises(ValueError, match="http"):
    remote.RemoteFaceCompare("ftp://x")


@pytest.mark.assets
def test_reference_server_with_the_bundled_mobilefacenet_on_real_faces(assets_dir):
  fr = pytest.importorskip("erasablemask_jax.fr")
  from PIL import Image  # pylint: disable=import-outside-toplevel
  folder = assets_dir / "images" / "derived_aligned112" / "celeba_wild_identities"
  # 001085 and 007710 are CelebA identity 7201; 000114 is another person (identity_CelebA_subset.txt).
  a, b, other = (np.asarray(Image.open(folder / f"{name}.png").convert("RGB")) for name in ("001085", "007710", "000114"))
  recogniser = fr.load_bundled()
  with _serving(compare_server.make_server(recogniser.embed, input_size=recogniser.input_size)) as url:
    client = remote.RemoteFaceCompare(url, timeout_s=120, max_requests_per_s=None)
    genuine, impostor = client.compare(a, b), client.compare(a, other)
  e = recogniser.embed(np.stack([a, b, other]))
  assert genuine == pytest.approx(float(e[0] @ e[1]), abs=1e-5)
  assert impostor == pytest.approx(float(e[0] @ e[2]), abs=1e-5)
  assert genuine > impostor


def test_a_dropped_connection_is_retried_like_a_5xx():
  with _serving(_scripted_server([("drop", 0.0), ("drop", 0.0)])) as url:
    client = remote.RemoteFaceCompare(url, backoff_s=0.01, max_retries=3, max_requests_per_s=None)
    assert client.compare(_faces(1)[0], _faces(1)[0]) == 0.5
  assert client.requests_made == 3
  with _serving(_scripted_server([("drop", 0.0)] * 3)) as url:
    client = remote.RemoteFaceCompare(url, backoff_s=0.01, max_retries=1, max_requests_per_s=None)
    with pytest.raises(remote.RemoteCompareError, match=r"all 2 attempts \(last: connection dropped \(Remote"):
      client.compare(_faces(1)[0], _faces(1)[0])


# ---------------------------------------------------------------------------------------------------------------------
# The reference server's limits.

def _post(url, body: bytes, timeout=10):
  request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read() or b"{}")


def _pair_body(a: bytes, b: bytes) -> bytes:
  return json.dumps({"image1": base64.b64encode(a).decode(), "image2": base64.b64encode(b).decode()}).encode()


def _bomb_png(side=60000) -> bytes:
  """A PNG whose header claims side x side 1-bit pixels (3.6 gigapixels) in a few hundred bytes."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_reference_server_refuses_oversized_tiny_and_bomb_images(tiny_embed):
  face = remote.to_png(_faces(1, size=40)[0])
  with _serving(compare_server.make_server(tiny_embed, input_size=(32, 32), max_body_bytes=30_000)) as url:
    status, answer = _post(url, _pair_body(face, face) + b" " * 30_000)
    assert status == 413 and "over the limit of 30000" in answer["error"]
    status, answer = _post(url, _pair_body(remote.to_png(_faces(1, size=8)[0]), face))
    assert status == 400 and "too small: 8x8" in answer["error"]
    status, answer = _post(url, _pair_body(_bomb_png(), face))
    assert status == 400 and "too large" in answer["error"] and "decompression-bomb" in answer["error"]
    assert _post(url, _pair_body(face, face))[0] == 200  # still serving


def test_reference_server_embeds_one_input_shape_whatever_the_sizes(tiny_embed):
  shapes = []

  def embed(images):
    shapes.append(images.shape)
    return tiny_embed(images)

  with _serving(compare_server.make_server(embed, input_size=(32, 32))) as url:
    client = remote.RemoteFaceCompare(url, max_requests_per_s=None)
    for size_a, size_b in ((40, 40), (64, 48), (100, 31)):
      a = np.random.default_rng(size_a).integers(0, 256, (size_a, size_b, 3), dtype=np.uint8)
      assert np.isfinite(client.compare(a, _faces(1, size=size_b)[0]))
  assert shapes == [(2, 32, 32, 3)] * 3


def test_reference_server_drops_a_stalled_connection(tiny_embed):
  with _serving(compare_server.make_server(tiny_embed, input_size=(32, 32), timeout_s=0.3)) as url:
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
      sock.sendall(b"POST /compare HTTP/1.1\r\nHost: x\r\n")  # and then nothing
      start = time.monotonic()
      assert sock.recv(100) == b""  # closed by the server
      assert time.monotonic() - start < 3


def test_reference_server_warns_when_reachable_from_other_machines(tiny_embed, caplog):
  with caplog.at_level(logging.WARNING, logger="erasablemask_jax.metrics.compare_server"):
    compare_server.make_server(tiny_embed, host="127.0.0.1").server_close()
    assert not caplog.records
    compare_server.make_server(tiny_embed, host="0.0.0.0").server_close()
  assert "bound to 0.0.0.0, reachable from other machines" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Face++: a local fake speaking its documented compare format.

KEY, SECRET = "test-key-5f3c", "test-secret-91ab"


def _facepp_server(script, seen):
  """Face++'s compare endpoint: a multipart form in, its JSON (or error) out. `script` is a list of answers consumed
  in order, each "ok", "noface", "busy" (403 CONCURRENCY_LIMIT_EXCEEDED), "badkey" (401 AUTHENTICATION_ERROR),
  "size" (400 INVALID_IMAGE_SIZE) or "413" (its plain-text entity-too-large); then "ok"."""
  script = list(script)
  lock = threading.Lock()

  class Handler(http.server.BaseHTTPRequestHandler):

    def log_message(self, *args):
      del args

    def _send(self, status, body, kind="application/json"):
      body = body if isinstance(body, bytes) else json.dumps(body).encode()
      self.send_response(status)
      self.send_header("Content-Type", kind)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def do_POST(self):  # pylint: disable=invalid-name
      raw = self.rfile.read(int(self.headers["Content-Length"]))
      message = email.parser.BytesParser().parsebytes(
          b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
      form = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True).decode()
              for part in message.get_payload()}
      seen.append(form)
      with lock:
        answer = script.pop(0) if script else "ok"
      if set(form) != {"api_key", "api_secret", "image_base64_1", "image_base64_2"} or form["api_key"] != KEY \
          or form["api_secret"] != SECRET or answer == "badkey":
        return self._send(401, {"time_used": 1, "error_message": "AUTHENTICATION_ERROR", "request_id": "r"})
      if answer == "busy":
        return self._send(403, {"time_used": 1, "error_message": "CONCURRENCY_LIMIT_EXCEEDED", "request_id": "r"})
      if answer == "size":
        return self._send(400, {"time_used": 1, "error_message": "INVALID_IMAGE_SIZE:image_base64_1"})
      if answer == "413":
        return self._send(413, b"Request Entity Too Large", "text/plain")
      images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(form[f"image_base64_{i}"])))) for i in (1, 2)]
      if answer == "noface":
        return self._send(200, {"time_used": 3, "faces1": [], "faces2": [{"face_token": "t"}], "request_id": "r"})
      same = float(np.mean(images[0] == images[1]))
      return self._send(200, {"time_used": 473, "confidence": round(100 * same, 3),
                              "thresholds": {"1e-3": 62.327, "1e-5": 73.975, "1e-4": 69.101},
                              "request_id": "1469761507,07174361", "image_id1": "a", "image_id2": "b",
                              "faces1": [{"face_token": "x"}], "faces2": [{"face_token": "y"}]})

  return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)


def _facepp_client(url, **kwargs):
  return remote.make_client("facepp", url, environ={"FACEPP_API_KEY": KEY, "FACEPP_API_SECRET": SECRET},
                            max_requests_per_s=None, backoff_s=0.01, **kwargs)


def test_facepp_preset_sends_its_form_and_reads_confidence_and_thresholds():
  seen = []
  a, b = _faces(2, size=64)
  with _serving(_facepp_server([], seen)) as url:
    client = _facepp_client(url)
    assert client.compare(a, a) == 100.0
    assert client.compare(a, b) < 5
  assert client.thresholds == {"1e-3": 62.327, "1e-4": 69.101, "1e-5": 73.975}
  assert base64.b64decode(seen[0]["image_base64_1"]) == remote.to_png(a)
  assert client.requests_made == 2


def test_facepp_rate_limit_is_backed_off_and_retried_and_no_face_is_nan():
  seen = []
  delays = []
  with _serving(_facepp_server(["busy", "busy", "ok", "noface"], seen)) as url:
    client = _facepp_client(url, sleep=lambda s: (delays.append(s), time.sleep(s)))
    face = _faces(1, size=64)[0]
    assert client.compare(face, face) == 100.0
    assert delays == [0.01, 0.02] and client.requests_made == 3
    assert np.isnan(client.compare(face, face))  # documented: no confidence when no face was found


@pytest.mark.parametrize("answer, message", [
    ("badkey", r"HTTP 401 AUTHENTICATION_ERROR: the API key and secret do not match: check FACEPP_API_KEY and "
               r"FACEPP_API_SECRET"),
    ("size", r"HTTP 400 INVALID_IMAGE_SIZE:image_base64_1: Face\+\+ takes images of 48x48 to 4096x4096"),
    ("413", r"HTTP 413 Request Entity Too Large: see the Face\+\+ compare API's error codes"),
])
def test_facepp_errors_are_one_clear_error_without_the_keys(answer, message, caplog):
  seen = []
  with caplog.at_level(logging.DEBUG), _serving(_facepp_server([answer], seen)) as url:
    client = _facepp_client(url, max_retries=3)
    with pytest.raises(remote.RemoteCompareError, match=message) as e:
      client.compare(_faces(1, size=64)[0], _faces(1, size=64)[0])
  assert client.requests_made == 1  # not retried
  for text in (str(e.value), repr(client), caplog.text):
    assert KEY not in text and SECRET not in text


def test_facepp_keys_come_from_the_environment(monkeypatch):
  monkeypatch.delenv("FACEPP_API_KEY", raising=False)
  monkeypatch.setenv("FACEPP_API_SECRET", SECRET)
  with pytest.raises(remote.MissingCredentialsError, match="set FACEPP_API_KEY"):
    remote.make_client("facepp")
  monkeypatch.setenv("FACEPP_API_KEY", KEY)
  client = remote.make_client("facepp")
  assert client.url == remote.FACEPP_URL and KEY not in repr(client) and SECRET not in repr(client)
  with pytest.raises(ValueError, match="unknown remote API 'nope'"):
    remote.make_client("nope", "http://x")


def test_evaluation_records_facepp_thresholds_no_face_counts_and_strict_json():
  from erasablemask_jax.evaluation import report  # pylint: disable=import-outside-toplevel

  faces = _faces(3, size=64).astype(np.float32) / 127.5 - 1.0
  images = {"clean": faces, "adv": faces[::-1], "rec": faces}
  with _serving(_facepp_server(["ok", "ok", "ok", "noface"], [])) as url:
    out = report._remote(_facepp_client(url), images, faces[:1])  # pylint: disable=protected-access
  assert out["clean"]["confidence"][0] == 100.0 and out["adv"]["no_face"] == 1
  assert out["adv"]["confidence"][0] is None and out["adv"]["mean_confidence"] is not None
  assert out["thresholds"] == {"1e-3": 62.327, "1e-4": 69.101, "1e-5": 73.975}
  assert out["clean"]["at_or_above"]["1e-4"] == pytest.approx(1 / 3)
  assert out["requests"] == 9
  json.dumps(out, allow_nan=False)
