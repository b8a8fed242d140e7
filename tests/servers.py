"""Real servers on 127.0.0.1 for the alerting tests: HTTP, SMTP and a syslog socket.

Each records what it receives and answers what the test scripted. Every
socket has a timeout, and every server stops when its ``with`` block ends.
"""

import base64
import contextlib
import http.server
import os
import socket
import socketserver
import ssl
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
SELF_SIGNED_PEM = os.path.join(HERE, "data", "selfsigned.pem")  # CN and SAN 127.0.0.1, for tests only
SOCKET_TIMEOUT_S = 10.0


class Reply:
    """One scripted HTTP answer; ``hang`` holds the connection without answering until the server stops."""

    def __init__(self, status=200, body=b"", headers=None, hang=False, echo_path=False, echo=None, trickle_s=None):
        self.status = status
        # With trickle_s: the status and headers (Content-Length 65536) at once, then one byte of the body
        # every trickle_s until the server stops: a service that answers, but never finishes.
        self.trickle_s = trickle_s
        self.echo_path = echo_path  # add the request's path to the body, as some services' errors do
        self.echo = echo  # echo(request) -> str, added to the body: what a receiver repeats back
        self.body = body.encode("utf-8") if isinstance(body, str) else body
        self.headers = dict(headers or {})
        self.hang = hang


class Request:
    def __init__(self, method, path, headers, body):
        self.method = method
        self.path = path
        self.headers = headers  # an email.message.Message: case-insensitive get()
        self.body = body

    def json(self):
        import json

        return json.loads(self.body.decode("utf-8"))


class _Serving:
    """A socketserver run in a thread for the length of a ``with`` block."""

    def _serve(self, server):
        self._server = server
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def port(self):
        return self._server.server_address[1]

    def _stopping_now(self):
        """Called first when the block ends: release whatever a handler waits on."""

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stopping_now()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(SOCKET_TIMEOUT_S)


class HTTPServer(_Serving):
    """``with HTTPServer(Reply(429, ...), Reply(200, "ok")) as server``: answers in order, then ``default``."""

    def __init__(self, *replies, default=None, tls=False):
        self.tls = bool(tls)
        self.replies = list(replies)
        self.default = default or Reply(200, b"ok")
        self.requests = []
        # Called just before the answer is written and once it is written: a test may stop the client
        # first (SIGSTOP) and kill it after, so the answer is on the wire and never read.
        self.before_reply = None
        self.after_reply = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = SOCKET_TIMEOUT_S
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with owner._lock:
                    owner.requests.append(Request(self.command, self.path, self.headers, body))
                    reply = owner.replies.pop(0) if owner.replies else owner.default
                if reply.hang:
                    owner._stopping.wait(SOCKET_TIMEOUT_S)
                    self.close_connection = True
                    return
                body = reply.body + (f" {self.path}".encode() if reply.echo_path else b"")
                if reply.echo is not None:
                    body += f" {reply.echo(owner.requests[-1])}".encode()
                if owner.before_reply is not None:
                    owner.before_reply()
                if reply.trickle_s is not None:
                    self.trickle(reply)
                    return
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True
                if owner.after_reply is not None:
                    owner.after_reply()

            do_GET = do_PUT = do_DELETE = do_POST

            def trickle(self, reply):
                self.send_response(reply.status)
                self.send_header("Content-Length", "65536")
                self.end_headers()
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    while not owner._stopping.wait(reply.trickle_s):
                        self.wfile.write(b"x")
                        self.wfile.flush()

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
                    super().handle_error(request, client_address)  # a client that hung up is no news

        server = Server(("127.0.0.1", 0), Handler)
        if tls:  # the self-signed certificate for 127.0.0.1, or (a path) one a test made: clients verify it
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # only with its CA
            context.load_cert_chain(SELF_SIGNED_PEM if tls is True else tls)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._serve(server)

    def url(self, path="/"):
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    def _stopping_now(self):
        self._stopping.set()


class Mail:
    """One message the SMTP server took: envelope, data, and how the session went."""

    def __init__(self, sender, recipients, data, tls, login):
        self.sender = sender
        self.recipients = recipients
        self.data = data
        self.tls = tls
        self.login = login  # (user, password) or None

    def message(self):
        import email
        from email import policy

        return email.message_from_bytes(self.data, policy=policy.default)


class SMTPServer(_Serving):
    """A small ESMTP server: EHLO, STARTTLS, AUTH PLAIN and LOGIN, MAIL, RCPT, DATA, RSET, NOOP, QUIT.

    ``implicit_tls`` wraps every connection in TLS from the start (port 465 style);
    ``starttls`` offers STARTTLS; ``auth`` offers AUTH and ``accept_login`` decides it.
    """

    def __init__(self, *, implicit_tls=False, starttls=False, auth=False, accept_login=True, reject_rcpt=None,
                 trickle_s=None):
        self.mails = []
        self.trickle_s = trickle_s  # the greeting a byte every trickle_s, until the server stops
        self._stopping = threading.Event()
        self.sessions = 0
        self.implicit_tls = implicit_tls
        self.starttls = starttls
        self.auth = auth
        self.accept_login = accept_login
        self.reject_rcpt = reject_rcpt
        self.context = None
        if implicit_tls or starttls:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(SELF_SIGNED_PEM)
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = SOCKET_TIMEOUT_S

            def setup(self):
                self.tls_sockets = []  # wrapped here: closed here, as the server closes only its own
                if owner.implicit_tls:
                    try:
                        self.request = owner.context.wrap_socket(self.request, server_side=True)
                    finally:
                        self.tls_sockets.append(self.request)
                super().setup()

            def handle(self):
                owner.sessions += 1
                try:
                    _SMTPSession(owner, self).run()
                except OSError:  # ssl.SSLError among them: the client refused our certificate
                    pass

            def finish(self):
                try:
                    super().finish()
                except OSError:
                    pass
                for sock in self.tls_sockets:
                    sock.close()

        self._serve(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler))

    def _stopping_now(self):
        self._stopping.set()


class TrickleServer(_Serving):
    """A TCP server that sends one byte every ``trickle_s`` to whoever connects, until it stops: a peer that
    is there, and never says what is expected."""

    def __init__(self, trickle_s):
        owner = self
        self._stopping = threading.Event()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                with contextlib.suppress(OSError):
                    while not owner._stopping.wait(trickle_s):
                        self.request.sendall(b".")

        self._serve(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler))

    def _stopping_now(self):
        self._stopping.set()


class _SMTPSession:
    def __init__(self, server, handler):
        self.server = server
        self.handler = handler
        self.tls = server.implicit_tls
        self.login = None
        self.sender = None
        self.recipients = []

    def reply(self, line):
        if self.server.trickle_s is not None:
            for byte in line.encode("ascii") + b"\r\n":
                if self.server._stopping.wait(self.server.trickle_s):
                    return
                self.handler.wfile.write(bytes([byte]))
                self.handler.wfile.flush()
            return
        self.handler.wfile.write(line.encode("ascii") + b"\r\n")
        self.handler.wfile.flush()

    def read_line(self):
        line = self.handler.rfile.readline(4096)
        return line.decode("utf-8", "replace").rstrip("\r\n") if line else None

    def run(self):
        self.reply("220 127.0.0.1 ESMTP test")
        while True:
            line = self.read_line()
            if line is None:
                return
            verb, _, rest = line.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "HELO"):
                self.ehlo()
            elif verb == "STARTTLS" and self.server.starttls and not self.tls:
                self.reply("220 go ahead")
                self.handler.rfile.close()
                self.handler.wfile.close()
                self.handler.connection = self.server.context.wrap_socket(self.handler.connection, server_side=True)
                self.handler.tls_sockets.append(self.handler.connection)
                self.handler.rfile = self.handler.connection.makefile("rb")
                self.handler.wfile = self.handler.connection.makefile("wb")
                self.tls = True
            elif verb == "AUTH" and self.server.auth:
                self.authenticate(rest)
            elif verb == "MAIL":
                self.sender = rest.partition(":")[2].strip().strip("<>")
                self.recipients = []
                self.reply("250 ok")
            elif verb == "RCPT":
                recipient = rest.partition(":")[2].strip().strip("<>")
                if self.server.reject_rcpt and recipient == self.server.reject_rcpt:
                    self.reply("550 no such user")
                else:
                    self.recipients.append(recipient)
                    self.reply("250 ok")
            elif verb == "DATA":
                self.data()
            elif verb in ("RSET", "NOOP"):
                self.reply("250 ok")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("502 not implemented")

    def ehlo(self):
        lines = ["127.0.0.1"]
        if self.server.starttls and not self.tls:
            lines.append("STARTTLS")
        if self.server.auth:
            lines.append("AUTH PLAIN LOGIN")
        for line in lines[:-1]:
            self.reply(f"250-{line}")
        self.reply(f"250 {lines[-1]}")

    def authenticate(self, rest):
        mechanism, _, initial = rest.partition(" ")
        if mechanism.upper() == "PLAIN":
            if not initial:
                self.reply("334 ")
                initial = self.read_line() or ""
            _, user, password = base64.b64decode(initial).decode("utf-8").split("\0")
        else:
            self.reply("334 VXNlcm5hbWU6")
            user = base64.b64decode(self.read_line() or "").decode("utf-8")
            self.reply("334 UGFzc3dvcmQ6")
            password = base64.b64decode(self.read_line() or "").decode("utf-8")
        if self.server.accept_login:
            self.login = (user, password)
            self.reply("235 authenticated")
        else:
            self.reply("535 authentication failed")

    def data(self):
        self.reply("354 end with <CRLF>.<CRLF>")
        lines = []
        while True:
            raw = self.handler.rfile.readline(1 << 20)
            if not raw or raw in (b".\r\n", b".\n"):
                break
            lines.append(raw[1:] if raw.startswith(b"..") else raw)
        self.server.mails.append(Mail(self.sender, list(self.recipients), b"".join(lines), self.tls, self.login))
        self.reply("250 queued")


class SyslogSocket:
    """A Unix datagram socket standing in for /dev/log."""

    def __init__(self, path):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._sock.settimeout(SOCKET_TIMEOUT_S)

    def receive(self):
        return self._sock.recv(65536)

    def pending(self):
        """Every datagram already waiting, without blocking."""
        self._sock.setblocking(False)
        try:
            found = []
            while True:
                try:
                    found.append(self._sock.recv(65536))
                except BlockingIOError:
                    return found
        finally:
            self._sock.settimeout(SOCKET_TIMEOUT_S)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._sock.close()


def closed_port():
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_certificates(folder, days):
    """A CA and a certificate for 127.0.0.1 it signs, valid ``days`` from now, made by the openssl binary
    (None when there is none): the paths of the CA's PEM and of the server's (certificate and key)."""
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    ca_key, ca_pem = os.path.join(folder, "ca.key"), os.path.join(folder, "ca.pem")
    key, csr, cert = (os.path.join(folder, name) for name in ("server.key", "server.csr", "server.crt"))
    extensions = os.path.join(folder, "server.ext")
    with open(extensions, "w", encoding="ascii") as handle:
        handle.write("subjectAltName = IP:127.0.0.1\nbasicConstraints = critical, CA:FALSE\n"
                     "keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n"
                     "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid, issuer\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for argv in (
            [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_pem, "-days", "30", "-subj", "/CN=mm test CA",
             "-addext", "basicConstraints = critical, CA:TRUE", "-addext", "keyUsage = critical, keyCertSign, cRLSign",
             "-addext", "subjectKeyIdentifier = hash"],
            [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
            [openssl, "x509", "-req", "-in", csr, "-CA", ca_pem, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
             "-days", str(days), "-extfile", extensions]):
        subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=30, cwd=folder)
    server = os.path.join(folder, "server.pem")
    with open(server, "wb") as out:
        for part in (cert, key):
            with open(part, "rb") as handle:
                out.write(handle.read())
    return ca_pem, server
