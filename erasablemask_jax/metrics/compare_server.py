"""A local face-compare endpoint speaking `remote.py`'s protocol, answering with any embedding function.

    server = make_server(embed_fn, input_size=(112, 112))   # 127.0.0.1, a free port
    thread = start_in_thread(server)                          # server.server_address -> (host, port)
    ...; server.shutdown()

`embed_fn(images_uint8 [N, H, W, 3]) -> [N, D]` (e.g. `erasablemask_jax.fr.load(DIR).embed`); the confidence is
`scale * cos(e1, e2)` of the two L2-normalised embeddings. From the shell, with a converted FR model:

    python -m erasablemask_jax.metrics.compare_server --fr MODEL_DIR --port 8000
    # POST http://127.0.0.1:8000/compare  {"image1": b64 PNG, "image2": b64 PNG} -> {"confidence": c}

It is a test and demo fixture, yet it bounds what a client can make it do: a request body over `max_body_bytes` is
refused with 413 before it is read, a connection that stalls for `timeout_s` is closed, images are read by
`image_io.read_image` (corrupt files and decompression bombs refused with 400, as are images whose shorter side is
under `min_side`), and every image is resized to the model's `input_size` and both are embedded in one call, so
`embed_fn` sees one input shape and a jitted model compiles once, whatever sizes the clients send. It binds to
127.0.0.1 unless told otherwise, and warns when bound to anything else.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import http.server
import ipaddress
import json
import logging
import sys
import threading
from typing import Callable

import numpy as np
from PIL import Image

from erasablemask_jax import image_io

EmbedFn = Callable[[np.ndarray], np.ndarray]
MAX_BODY_BYTES = 8 << 20  # two base64 PNGs of a few megapixels
TIMEOUT_S = 30.0
MIN_SIDE = 24

log = logging.getLogger(__name__)


def decode_image(b64: str, input_size: tuple[int, int], min_side: int = MIN_SIDE) -> np.ndarray:
  """A base64 image -> uint8 [H, W, 3] at `input_size` (H, W).

  Raises:
    ValueError: not base64, or not an image `read_image` accepts (corrupt, too small, a decompression bomb).
  """
  try:
    data = base64.b64decode(b64, validate=True)
  except (binascii.Error, TypeError) as e:
    raise ValueError(f"not base64: {e}") from None
  try:
    image = image_io.read_image(data, "image", min_side=min_side)
  except image_io.SkipImage as e:
    raise ValueError(str(e)) from None
  h, w = input_size
  if image.shape[:2] != (h, w):
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.LANCZOS), np.uint8)
  return image


def pair_confidence(embed_fn: EmbedFn, image1: np.ndarray, image2: np.ndarray, scale: float = 1.0) -> float:
  """`scale * cos(embed(image1), embed(image2))`, both images (of one size) embedded in one call."""
  e1, e2 = np.asarray(embed_fn(np.stack([image1, image2])), np.float64)
  return float(scale * (e1 @ e2) / max(np.linalg.norm(e1) * np.linalg.norm(e2), 1e-12))


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def make_server(embed_fn: EmbedFn, host: str = "127.0.0.1", port: int = 0, path: str = "/compare",
                scale: float = 1.0, *, input_size: tuple[int, int] = (112, 112), max_body_bytes: int = MAX_BODY_BYTES,
                timeout_s: float = TIMEOUT_S, min_side: int = MIN_SIDE) -> http.server.ThreadingHTTPServer:
  """An HTTP server (not yet serving) answering POST `path` with `{"confidence": scale * cos}`.

  Args:
    embed_fn: uint8 [N, H, W, 3] -> [N, D] embeddings; always called with N = 2 at `input_size`.
    host: bind address (a warning is logged unless it is a loopback address).
    port: 0 picks a free port (read `server.server_address`).
    path: the endpoint path.
    scale: multiplies the cosine (100 mimics the 0-100 confidences of commercial APIs).
    input_size: (H, W) every image is resized to: the model's input, so it compiles for one shape.
    max_body_bytes: larger requests get 413 without being read.
    timeout_s: socket timeout of each connection (a stalled client is dropped).
    min_side: images with a shorter side are refused (400).
  """
  if not is_loopback(host):
    log.warning("the face-compare server is bound to %s, reachable from other machines; it has no authentication "
                "and is meant for local tests (bind to 127.0.0.1 unless you need otherwise)", host)
  lock = threading.Lock()  # one embedding at a time: jitted models are not re-entrant-friendly on 2 cores
  input_size = (int(input_size[0]), int(input_size[1]))

  class Handler(http.server.BaseHTTPRequestHandler):
    timeout = timeout_s  # applied to the socket by StreamRequestHandler.setup

    def log_message(self, *args):  # quiet: tests and users read the client's errors instead
      del args

    def _reply(self, status: int, payload: dict) -> None:
      body = json.dumps(payload).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      if status >= 400:
        self.send_header("Connection", "close")
        self.close_connection = True
      self.end_headers()
      self.wfile.write(body)

    def do_POST(self):  # pylint: disable=invalid-name
      if self.path != path:
        return self._reply(404, {"error": f"unknown path {self.path}; POST to {path}"})
      length = self.headers.get("Content-Length")
      if length is None:
        return self._reply(411, {"error": "a Content-Length header is required"})
      try:
        length = int(length)
        if length < 0:
          raise ValueError(length)
      except ValueError:
        return self._reply(400, {"error": f"bad Content-Length {self.headers.get('Content-Length')!r}"})
      if length > max_body_bytes:
        return self._reply(413, {"error": f"request body of {length} bytes is over the limit of {max_body_bytes}"})
      try:
        request = json.loads(self.rfile.read(length))
        images = [decode_image(request[k], input_size, min_side) for k in ("image1", "image2")]
      except (ValueError, KeyError, TypeError) as e:
        return self._reply(400, {"error": f"expected JSON {{'image1': b64 PNG, 'image2': b64 PNG}}: {e}"})
      try:
        with lock:
          confidence = pair_confidence(embed_fn, images[0], images[1], scale)
      except Exception as e:  # pylint: disable=broad-except  # the model failed: say so instead of dropping the line
        log.exception("embedding failed")
        return self._reply(500, {"error": f"embedding failed: {type(e).__name__}"})
      return self._reply(200, {"confidence": confidence})

  return http.server.ThreadingHTTPServer((host, port), Handler)


def start_in_thread(server: http.server.HTTPServer) -> threading.Thread:
  """Serves in a daemon thread; stop with `server.shutdown(); server.server_close()`."""
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  return thread


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Local face-compare endpoint answering with a converted FR model.")
  parser.add_argument("--fr", default=None, help="converted FR model directory (default: the bundled MobileFaceNet)")
  parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--scale", type=float, default=1.0, help="confidence = scale * cosine")
  parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger requests get HTTP 413")
  parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds a connection may stall")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  from erasablemask_jax import fr  # pylint: disable=import-outside-toplevel
  recogniser = fr.load(args.fr) if args.fr else fr.load_bundled()
  server = make_server(recogniser.embed, args.host, args.port, scale=args.scale, input_size=recogniser.input_size,
                       max_body_bytes=args.max_body_bytes, timeout_s=args.timeout)
  host, port = server.server_address[:2]
  print(f"face-compare endpoint ({recogniser.name}, input {recogniser.input_size[0]}x{recogniser.input_size[1]}) on "
        f"http://{host}:{port}/compare; Ctrl-C stops", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
