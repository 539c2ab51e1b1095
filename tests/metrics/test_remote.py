"""The HTTP face-compare client against real local servers on 127.0.0.1 (reference server, flaky, slow)."""

import contextlib
import http.server
import json
import threading
import time
import urllib.request

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  """A server answering POSTs from `script`: a list of (status, delay_s) consumed in order, then 200s."""
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
  with _serving(compare_server.make_server(tiny_embed)) as url:
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
  with _serving(compare_server.make_server(tiny_embed)) as url:
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
  with _serving(compare_server.make_server(recogniser.embed)) as url:
    client = remote.RemoteFaceCompare(url, timeout_s=120, max_requests_per_s=None)
    genuine, impostor = client.compare(a, b), client.compare(a, other)
  e = recogniser.embed(np.stack([a, b, other]))
  assert genuine == pytest.approx(float(e[0] @ e[1]), abs=1e-5)
  assert impostor == pytest.approx(float(e[0] @ e[2]), abs=1e-5)
  assert genuine > impostor
