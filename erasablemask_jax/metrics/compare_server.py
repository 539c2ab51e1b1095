"""A local face-compare endpoint speaking `remote.py`'s protocol, answering with any embedding function.

    server = make_server(embed_fn)                 # 127.0.0.1, a free port
    thread = start_in_thread(server)               # server.server_address -> (host, port)
    ...; server.shutdown()

`embed_fn(images_uint8 [N, H, W, 3]) -> [N, D]` (e.g. `erasablemask_jax.fr.load(DIR).embed`); the confidence is
`scale * cos(e1, e2)` of the two L2-normalised embeddings. From the shell, with a converted FR model:

    python -m erasablemask_jax.metrics.compare_server --fr MODEL_DIR --port 8000
    # POST http://127.0.0.1:8000/compare  {"image1": b64 PNG, "image2": b64 PNG} -> {"confidence": c}

It binds to 127.0.0.1 unless told otherwise; it is a test and demo fixture, not a hardened service.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import http.server
import io
import json
import sys
import threading
from typing import Callable

import numpy as np
from PIL import Image

EmbedFn = Callable[[np.ndarray], np.ndarray]


def _decode_png(b64: str) -> np.ndarray:
  image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
  return np.asarray(image.convert("RGB"), np.uint8)


def pair_confidence(embed_fn: EmbedFn, image1: np.ndarray, image2: np.ndarray, scale: float = 1.0) -> float:
  """`scale * cos(embed(image1), embed(image2))`, each image embedded alone (sizes may differ)."""
  e1, e2 = (np.asarray(embed_fn(im[None]), np.float64)[0] for im in (image1, image2))
  return float(scale * (e1 @ e2) / max(np.linalg.norm(e1) * np.linalg.norm(e2), 1e-12))


def make_server(embed_fn: EmbedFn, host: str = "127.0.0.1", port: int = 0, path: str = "/compare",
                scale: float = 1.0) -> http.server.ThreadingHTTPServer:
  """An HTTP server (not yet serving) answering POST `path` with `{"confidence": scale * cos}`.

  Args:
    embed_fn: uint8 [N, H, W, 3] -> [N, D] embeddings.
    host: bind address.
    port: 0 picks a free port (read `server.server_address`).
    path: the endpoint path.
    scale: multiplies the cosine (100 mimics the 0-100 confidences of commercial APIs).
  """
  lock = threading.Lock()  # one embedding at a time: jitted models are not re-entrant-friendly on 2 cores

  class Handler(http.server.BaseHTTPRequestHandler):

    def log_message(self, *args):  # quiet: tests and users read the client's errors instead
      del args

    def _reply(self, status: int, payload: dict) -> None:
      body = json.dumps(payload).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def do_POST(self):  # pylint: disable=invalid-name
      if self.path != path:
        return self._reply(404, {"error": f"unknown path {self.path}; POST to {path}"})
      try:
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        images = [_decode_png(request[k]) for k in ("image1", "image2")]
      except (ValueError, KeyError, TypeError, binascii.Error, OSError) as e:
        return self._reply(400, {"error": f"expected JSON {{'image1': b64 PNG, 'image2': b64 PNG}}: {e}"})
      with lock:
        confidence = pair_confidence(embed_fn, images[0], images[1], scale)
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
  parser.add_argument("--host", default="127.0.0.1")
  parser.add_argument("--port", type=int, default=8000)
  parser.add_argument("--scale", type=float, default=1.0, help="confidence = scale * cosine")
  args = parser.parse_args(argv)
  from erasablemask_jax import fr  # pylint: disable=import-outside-toplevel
  recogniser = fr.load(args.fr) if args.fr else fr.load_bundled()
  server = make_server(recogniser.embed, args.host, args.port, scale=args.scale)
  host, port = server.server_address[:2]
  print(f"face-compare endpoint ({recogniser.name}) on http://{host}:{port}/compare; Ctrl-C stops", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
