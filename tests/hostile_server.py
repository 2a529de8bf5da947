"""A hostile MAST for the tests: the loopback server with answers a careful attacker (or
a broken proxy) would give.

``HostileMast`` is ``nsclean.testing.mastserver.MastServer`` with these modes, each keyed by the
product file name it applies to:

``redirect``
    ``{name: base_url}``: downloads (HEAD and GET) of that file answer ``302`` to the
    same path and query on ``base_url`` (another loopback server playing another host).
``drip``
    ``{name: seconds}``: announce the full ``Content-Length``, then send the body one
    byte every ``seconds`` (a server that never stalls long enough for a read timeout).
``bad_length``
    ``{name: text}``: send ``Content-Length: <text>`` (e.g. ``"12abc"``) and the body.
``rename``
    ``{name: listed_name}``: the catalogue lists the file as ``listed_name`` (``../x``,
    an absolute path); downloads of the listed name still serve the file.
``duplicate``
    ``{name: size}``: the catalogue lists the file a second time with the given size
    (``None``: an identical second listing).
``data_uri``
    ``{name: uri}``: the catalogue gives the file this data URI (``file:///etc/...``).
``gzip``
    names whose body is sent gzip-compressed (``Content-Encoding: gzip``) whatever the
    client accepts, with ``Content-Length`` the compressed size: a decompression bomb.

Every request's headers are kept in ``headers_seen`` (path, headers) so that a test can
check which host received which cookie.
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from nsclean.testing.mastserver import MastServer, RequestRecord, _Handler

__all__ = ["HostileMast"]


class _HostileHandler(_Handler):
    def do_POST(self):  # noqa: N802 - the stdlib's name
        with self.mast._lock:
            self.mast.headers_seen.append((self.path, dict(self.headers.items())))
        super().do_POST()

    def _get_or_head(self, head: bool):
        mast = self.mast
        parts = urlsplit(self.path)
        uri = parse_qs(parts.query).get("uri", [""])[0]
        listed = uri.removeprefix("mast:JWST/product/")
        name = mast.listed_to_file.get(listed, uri.rsplit("/", 1)[-1])
        with mast._lock:
            mast.headers_seen.append((self.path, dict(self.headers.items())))
        method = "HEAD" if head else "GET"
        if name in mast.redirect:
            record = RequestRecord(method, parts.path, name,
                                   authenticated=self._authenticated() is not None)
            target = mast.redirect[name].rstrip("/") + self.path
            self._send(record, 302, b"", "text/plain", extra_headers={"Location": target},
                       head=head)
            return
        path = mast.catalogue.files.get(name)
        if path is not None and not head and (name in mast.drip or name in mast.bad_length
                                              or name in mast.gzip):
            self._hostile_body(method, parts.path, name, path)
            return
        if listed != name:  # a renamed listing: serve the real file under that name
            self.path = self.path.replace(parts.query, f"uri=mast:JWST/product/{name}")
        super()._get_or_head(head)

    def _hostile_body(self, method, url_path, name, path: Path):
        record = RequestRecord(method, url_path, name, status=200,
                               authenticated=self._authenticated() is not None)
        record.fault = ("drip" if name in self.mast.drip else
                        "gzip" if name in self.mast.gzip else "bad_length")
        self.mast._record(record)
        body = path.read_bytes()
        if name in self.mast.gzip:  # the file, then 64 MiB of zeros, compressed
            body = gzip.compress(body + bytes(64 << 20), compresslevel=1)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if name in self.mast.gzip:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", self.mast.bad_length.get(name, str(len(body))))
        if name in self.mast.bad_length:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            if name in self.mast.bad_length or name in self.mast.gzip:
                self.wfile.write(body)
                self.close_connection = True
                return
            for index in range(len(body)):
                self.wfile.write(body[index:index + 1])
                self.wfile.flush()
                time.sleep(self.mast.drip[name])
                if self.mast.stopping:
                    break
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        self.close_connection = True


class HostileMast(MastServer):
    """``MastServer`` with hostile answers (see the module documentation)."""

    handler_class = _HostileHandler

    def __init__(self, root, *, redirect=None, drip=None, bad_length=None, rename=None,
                 duplicate=None, data_uri=None, gzip=(), **kwargs):
        super().__init__(root, **kwargs)
        self.redirect = dict(redirect or {})
        self.drip = dict(drip or {})
        self.bad_length = dict(bad_length or {})
        self.gzip = set(gzip)
        self.headers_seen: list[tuple[str, dict]] = []
        self.listed_to_file: dict[str, str] = {}
        self.stopping = False
        for name, listed in (rename or {}).items():
            self.listed_to_file[listed] = name
            for products in self.catalogue.products_by_obsid.values():
                for product in products:
                    if product["productFilename"] == name:
                        product["productFilename"] = listed
                        product["dataURI"] = f"mast:JWST/product/{listed}"
        for name, uri in (data_uri or {}).items():
            for products in self.catalogue.products_by_obsid.values():
                for product in products:
                    if product["productFilename"] == name:
                        product["dataURI"] = uri
        for name, size in (duplicate or {}).items():
            for products in self.catalogue.products_by_obsid.values():
                for product in list(products):
                    if product["productFilename"] == name:
                        products.append(dict(product, size=product["size"] if size is None
                                             else size))

    def stop(self) -> None:
        self.stopping = True  # a dripping answer ends with the server
        super().stop()

    def cookies_seen(self) -> list[str]:
        """The Cookie headers of every request this server received."""
        return [headers.get("Cookie", "") for _, headers in self.headers_seen]

