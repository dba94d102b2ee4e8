"""A ModelScope hub stand-in on 127.0.0.1: the few endpoints the client uses to resolve and download a
model repo, serving files from local folders. Requests are logged so tests can see what was fetched."""

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


class FakeHub:
    def __init__(self):
        self.repos = {}  # 'owner/name' -> local folder
        self.requests = []
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self._server.server_port}'

    def add_repo(self, repo_id: str, folder: str) -> None:
        self.repos[repo_id] = folder

    def start(self) -> 'FakeHub':
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self):
        return [r for r in self.requests if 'FilePath=' in r]

    def _files(self, folder):
        entries = []
        for root, _, names in os.walk(folder):
            for name in sorted(names):
                full = os.path.join(root, name)
                rel = os.path.relpath(full, folder).replace(os.sep, '/')
                if rel.startswith('.'):
                    continue
                entries.append({'Path': rel, 'Name': name, 'Type': 'blob', 'Size': os.path.getsize(full),
                                'Sha256': _sha256(full)})
        return entries

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, content_type='application/json'):
                self.send_response(status)
                self.send_header('Content-Type', content_type)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, payload, status=200):
                self._send(status, json.dumps(payload).encode())

            def do_GET(self):  # noqa: N802 (http.server's name)
                hub.requests.append(self.path)
                url = urlparse(self.path)
                parts = url.path.strip('/').split('/')
                query = parse_qs(url.query)
                if parts[:3] == ['openapi', 'v1', 'models'] and len(parts) == 5:
                    repo_id = '/'.join(parts[3:5])
                    if repo_id not in hub.repos:
                        return self._json({'success': False, 'message': 'not found'}, 404)
                    return self._json({'success': True, 'data': {'id': repo_id}})
                if parts[:3] == ['api', 'v1', 'models'] and len(parts) >= 6 and parts[5] == 'repo':
                    repo_id = '/'.join(parts[3:5])
                    folder = hub.repos.get(repo_id)
                    if folder is None:
                        return self._json({'Code': 404, 'Success': False, 'Message': 'not found'}, 404)
                    if parts[6:] == ['files']:
                        return self._json({'Code': 200, 'Success': True, 'Data': {'Files': hub._files(folder)}})
                    if 'FilePath' in query:
                        path = os.path.join(folder, query['FilePath'][0])
                        if not os.path.isfile(path):
                            return self._json({'Code': 404, 'Success': False}, 404)
                        with open(path, 'rb') as f:
                            return self._send(200, f.read(), 'application/octet-stream')
                return self._json({'Code': 404, 'Success': False, 'Message': 'not served'}, 404)

        return Handler
