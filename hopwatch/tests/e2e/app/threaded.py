"""A thread-per-request server (the standard library's ThreadingHTTPServer) for the request
tracing tests: GET /work?key=K sleeps a random few milliseconds, then reads Redis key K (redis-py,
blocking, a connection pool shared by the threads) and answers. The key is the truth joining a
request to the Redis command made for it.

Configuration from the environment: APP_HOST, APP_PORT, APP_REDIS_HOST, APP_REDIS_PORT.
"""

import os
import random
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import redis

POOL = redis.ConnectionPool(
    host=os.environ["APP_REDIS_HOST"], port=int(os.environ["APP_REDIS_PORT"]), max_connections=64
)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/health":
            return self.answer(b"ok")
        key = parse_qs(url.query).get("key", [""])[0]
        time.sleep(random.uniform(0.0, 0.02))
        value = redis.Redis(connection_pool=POOL).get(key)
        self.answer(value or b"-")

    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer((os.environ["APP_HOST"], int(os.environ["APP_PORT"])), Handler).serve_forever()
