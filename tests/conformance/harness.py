#!/usr/bin/env python3
"""Conformance harness: puts the relay plus an echo peer in front of kosoku as one echo server.

kosoku (the Autobahn fuzzing client, a pinned PyPI package) speaks plain `ws://` only and
cannot add request headers, while the relay speaks only TLS and wants a token. So kosoku is
pointed at a small **shim** on 127.0.0.1 that, for each connection kosoku opens:

* reads kosoku's HTTP upgrade request and rewrites only its request line and `Host` (plus,
  on the sender leg, adds `ServiceBusAuthorization`); kosoku's own `Sec-WebSocket-Key`,
  `-Version`, `-Extensions` stay as they are, so the relay answers kosoku's handshake;
* opens TLS to the relay, verifying the relay's certificate against its CA (DATA/ca.pem);
* from then on copies bytes both ways untouched: every frame kosoku sends reaches the relay
  as sent, every byte the relay answers reaches kosoku as sent. When one side closes its
  connection the shim closes the other.

On the other leg of the tunnel sits the **echo peer**, a WebSocket client written here at frame
level (not with a library) so that it is transparent: it echoes each data frame with the same
FIN and opcode (text stays text, binary binary, message boundaries and even fragment
boundaries are kept), never validates UTF-8 (what reaches kosoku is what the relay did, not
what a library did), answers a Close with a Close carrying the same payload, and then waits
for the relay to close the TCP connection. Anything unexpected the relay sends it (a masked
frame, RSV bits, an unknown opcode, a bad Close) is printed as an ANOMALY line.

Legs:

* ``--leg sender``: kosoku is the sender (`sb-hc-action=connect`, Send token); the echo peer is
  the listener (control channel with a Listen token, then every `accept` address).
* ``--leg listener``: kosoku is the listener's rendezvous leg. The shim holds the control
  channel; for each kosoku connection it starts an echo sender with a fresh `sb-hc-id`, waits
  for the matching `accept`, and sends kosoku's upgrade request to that address.

Subcommands: ``leg`` runs one leg and writes ``results.json`` (case -> [behavior,
behaviorClose]); ``compare`` checks results against ``expected.json``; ``freeze`` writes
``expected.json`` from results.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import ssl
import struct
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPS = (OP_CONT, OP_TEXT, OP_BINARY)
# Largest HTTP head accepted from kosoku or the relay.
HEAD_LIMIT = 64 * 1024
# Seconds any one handshake (TLS + upgrade, or waiting for an accept) may take.
HANDSHAKE_TIMEOUT = 15
# After the echo peer answers a Close, how long it waits for the relay to close the TCP
# connection (the server closes first) before giving up.
CLOSE_WAIT = 10
# A case that takes this long (ms) is reported as slow: the suite's waits are at most a few
# seconds, so this means a stall (see README.md, "Known relay bug").
SLOW_MS = 30_000

anomalies: list[str] = []


def anomaly(msg: str) -> None:
    """Something the relay should never do; printed, counted, and reported at the end."""
    anomalies.append(msg)
    print(f"ANOMALY: {msg}", file=sys.stderr, flush=True)


# === SAS tokens (protocol.md §3) ===


def parse_connection_string(cs: str) -> dict[str, str]:
    """`Endpoint=...;SharedAccessKeyName=...;...`: split on `;`, each part on the first `=`."""
    out = {}
    for part in cs.strip().split(";"):
        if part:
            k, _, v = part.partition("=")
            out[k.lower()] = v
    return out


def sas_token(resource: str, key_name: str, key: str, expiry: int) -> str:
    """The token of protocol.md §3.2: HMAC-SHA256 keyed with the key's *text*, over the
    percent-encoded resource, a LF and the expiry."""
    sr = urllib.parse.quote(resource, safe="")
    mac = hmac.new(key.encode(), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = urllib.parse.quote(base64.b64encode(mac).decode(), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn={key_name}"


def token_for(cs: str, ttl: int = 3600) -> str:
    """A token for the connection string's entity (its `EntityPath`)."""
    f = parse_connection_string(cs)
    host = urllib.parse.urlsplit(f["endpoint"]).hostname
    resource = f"http://{host}/{f['entitypath']}"
    return sas_token(
        resource, f["sharedaccesskeyname"], f["sharedaccesskey"], int(time.time()) + ttl
    )


def check_token_vector() -> None:
    """protocol.md §3.8 Vector 1, so a signing mistake shows here and not as 401s."""
    got = sas_token(
        "http://contoso.servicebus.windows.net/hyco/",
        "RootManageSharedAccessKey",
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        1735689600,
    )
    want = (
        "SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F"
        "&sig=iLqy8P8174rSlBQ2BNUuuSRl83lIbAXsiGrmD4WS9B8%3D&se=1735689600"
        "&skn=RootManageSharedAccessKey"
    )
    if got != want:
        raise SystemExit(f"SAS signing does not match protocol.md §3.8 vector 1:\n{got}\n{want}")


# === WebSocket client framing (RFC 6455 §5) ===


class ProtocolViolation(Exception):
    """The relay sent something a WebSocket server must not."""


def xor_mask(data: bytes, key: bytes) -> bytes:
    """Masks or unmasks `data`; big-integer XOR keeps 16 MiB payloads fast in Python."""
    n = len(data)
    if n == 0:
        return data
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")


def encode_frame(fin: bool, opcode: int, payload: bytes) -> bytes:
    """A masked client frame with a fresh random key."""
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    key = os.urandom(4)
    return head + key + xor_mask(payload, key)


async def read_frame(reader: asyncio.StreamReader) -> tuple[bool, int, bytes]:
    """One frame from the relay (a server: unmasked, no RSV, known opcodes)."""
    b0, b1 = await reader.readexactly(2)
    fin, rsv, opcode = bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    if b1 & 0x80:
        raise ProtocolViolation("masked frame from the relay")
    if rsv:
        raise ProtocolViolation(f"RSV bits {rsv >> 4:#x} set by the relay")
    if opcode not in (*DATA_OPS, OP_CLOSE, OP_PING, OP_PONG):
        raise ProtocolViolation(f"unknown opcode {opcode:#x} from the relay")
    if opcode >= 0x8 and (n > 125 or not fin):
        raise ProtocolViolation("fragmented or oversized control frame from the relay")
    return fin, opcode, await reader.readexactly(n) if n else b""


def check_close_payload(payload: bytes) -> None:
    """A Close the relay forwards must itself be valid (attacks.md D6)."""
    if len(payload) == 1:
        raise ProtocolViolation("1-byte Close payload from the relay")
    if len(payload) >= 2:
        (code,) = struct.unpack("!H", payload[:2])
        if not (1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999):
            raise ProtocolViolation(f"close code {code} from the relay")
        try:
            payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation("Close reason with invalid UTF-8 from the relay") from None


def tls_context(ca: str) -> ssl.SSLContext:
    """Trusts the relay's CA (and verifies the host name); nothing is switched off."""
    return ssl.create_default_context(cafile=ca)


async def read_head(reader: asyncio.StreamReader) -> list[str]:
    """An HTTP head as lines (request/status line first), without the blank line."""
    raw = await reader.readuntil(b"\r\n\r\n")
    return raw.decode("latin-1").split("\r\n")[:-2]


async def ws_connect(
    url: str, ctx: ssl.SSLContext, headers: list[tuple[str, str]]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, list[str]]:
    """Opens a WebSocket to the relay; returns the streams and the 101 response head."""
    u = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(
        u.hostname, u.port or 443, ssl=ctx, server_hostname=u.hostname, limit=HEAD_LIMIT
    )
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        target = u.path + (f"?{u.query}" if u.query else "")
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {u.netloc}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in headers),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await read_head(reader)
        if not head[0].startswith("HTTP/1.1 101"):
            raise ConnectionError(f"{url.split('?')[0]}: {head[0]}")
        want = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        accept = [
            h.split(":", 1)[1].strip()
            for h in head
            if h.lower().startswith("sec-websocket-accept:")
        ]
        if accept != [want]:
            raise ProtocolViolation(f"Sec-WebSocket-Accept {accept} (want {want})")
        return reader, writer, head
    except BaseException:
        writer.close()
        raise


# === The echo peer ===


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, role: str) -> None:
    """Echoes frames until the relay forwards a Close (answered with the same payload) or the
    connection ends. An abort (EOF without Close) just ends it: the relay mirrors aborts."""
    try:
        while True:
            fin, opcode, payload = await read_frame(reader)
            if opcode in DATA_OPS:
                writer.write(encode_frame(fin, opcode, payload))
                await writer.drain()
            elif opcode == OP_PING:
                writer.write(encode_frame(True, OP_PONG, payload))
                await writer.drain()
            elif opcode == OP_CLOSE:
                check_close_payload(payload)
                writer.write(encode_frame(True, OP_CLOSE, payload))
                await writer.drain()
                # The server closes the TCP connection first; wait for that.
                try:
                    rest = await asyncio.wait_for(reader.read(), CLOSE_WAIT)
                except asyncio.TimeoutError:
                    anomaly(
                        f"{role} echo: connection still open {CLOSE_WAIT} s after the closing handshake"
                    )
                    return
                except (OSError, ssl.SSLError):
                    return
                if rest:
                    anomaly(f"{role} echo: {len(rest)} bytes from the relay after its Close")
                return
    except ProtocolViolation as e:
        anomaly(f"{role} echo: {e}")
    except (asyncio.IncompleteReadError, OSError, ssl.SSLError):
        pass
    finally:
        writer.close()


# === The shim between kosoku and the relay ===


async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copies bytes until `src` ends, then closes `dst` (which ends the opposite pump)."""
    try:
        while data := await src.read(256 * 1024):
            dst.write(data)
            await dst.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        dst.close()


async def splice_to_relay(
    kr: asyncio.StreamReader,
    kw: asyncio.StreamWriter,
    head: list[str],
    url: str,
    ctx: ssl.SSLContext,
    extra: list[tuple[str, str]],
) -> None:
    """Sends kosoku's upgrade request, retargeted at `url`, to the relay; then copies bytes."""
    u = urllib.parse.urlsplit(url)
    rr, rw = await asyncio.wait_for(
        asyncio.open_connection(u.hostname, u.port or 443, ssl=ctx, server_hostname=u.hostname),
        HANDSHAKE_TIMEOUT,
    )
    target = u.path + (f"?{u.query}" if u.query else "")
    kept = [h for h in head[1:] if not h.lower().startswith("host:")]
    lines = [f"GET {target} HTTP/1.1", f"Host: {u.netloc}", *kept, *(f"{k}: {v}" for k, v in extra)]
    rw.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await asyncio.gather(pump(kr, rw), pump(rr, kw))


class Harness:
    """Shim and echo peer for one leg."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.leg = args.leg
        self.relay = args.relay
        self.hc = args.hc
        self.ctx = tls_context(args.ca)
        self.listen_token = token_for(args.listen_cs)
        self.send_token = token_for(args.send_cs)
        self.base = f"wss://{self.relay}/$hc/{self.hc}"
        # Listener leg: connection id -> future of its accept address.
        self.pending: dict[str, asyncio.Future[str]] = {}
        self.tasks: set[asyncio.Task] = set()
        self.counts = {"connections": 0, "accepts": 0, "failed": 0}

    def spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def control_channel(self, ready: asyncio.Future) -> None:
        """The listener's control channel: hands out accepts, answers pings. Ends the run if
        the relay drops it."""
        url = f"{self.base}?sb-hc-action=listen&sb-hc-id={uuid.uuid4()}"
        reader, writer, _ = await asyncio.wait_for(
            ws_connect(url, self.ctx, [("ServiceBusAuthorization", self.listen_token)]),
            HANDSHAKE_TIMEOUT,
        )
        ready.set_result(None)
        message = b""
        try:
            while True:
                fin, opcode, payload = await read_frame(reader)
                if opcode == OP_PING:
                    writer.write(encode_frame(True, OP_PONG, payload))
                    await writer.drain()
                    continue
                if opcode == OP_PONG:
                    continue
                if opcode == OP_CLOSE:
                    raise ConnectionError(f"the relay closed the control channel: {payload[2:]!r}")
                message += payload
                if not fin:
                    continue
                cmd, message = json.loads(message), b""
                if "accept" in cmd:
                    self.counts["accepts"] += 1
                    self.on_accept(cmd["accept"])
        finally:
            writer.close()

    def on_accept(self, accept: dict) -> None:
        if self.leg == "sender":
            self.spawn(self.accept_and_echo(accept["address"]))
        else:
            fut = self.pending.pop(accept["id"], None)
            if fut is None or fut.done():
                anomaly(f"accept for an unknown connection id {accept['id']!r}")
            else:
                fut.set_result(accept["address"])

    async def accept_and_echo(self, address: str) -> None:
        """Sender leg: the echo peer takes the rendezvous and echoes."""
        try:
            r, w, _ = await asyncio.wait_for(ws_connect(address, self.ctx, []), HANDSHAKE_TIMEOUT)
        except ProtocolViolation as e:
            anomaly(f"rendezvous failed: {e}")
            return
        except (asyncio.TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            self.counts["failed"] += 1
            print(f"rendezvous failed: {e!r}", file=sys.stderr)
            return
        await echo(r, w, "listener")

    async def send_and_echo(self, conn_id: str) -> None:
        """Listener leg: the echo peer is the sender."""
        url = f"{self.base}?sb-hc-action=connect&sb-hc-id={conn_id}"
        headers = [("ServiceBusAuthorization", self.send_token)]
        try:
            r, w, _ = await asyncio.wait_for(
                ws_connect(url, self.ctx, headers), HANDSHAKE_TIMEOUT * 2
            )
        except ProtocolViolation as e:
            anomaly(f"sender connect failed: {e}")
            return
        except (asyncio.TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            self.counts["failed"] += 1
            print(f"sender connect failed: {e!r}", file=sys.stderr)
            return
        await echo(r, w, "sender")

    async def on_kosoku(self, kr: asyncio.StreamReader, kw: asyncio.StreamWriter) -> None:
        """One kosoku connection (one case): route it into the relay."""
        self.counts["connections"] += 1
        conn_id = None
        try:
            head = await asyncio.wait_for(read_head(kr), HANDSHAKE_TIMEOUT)
            if self.leg == "sender":
                url = f"{self.base}?sb-hc-action=connect"
                extra = [("ServiceBusAuthorization", self.send_token)]
            else:
                conn_id = str(uuid.uuid4())
                fut = asyncio.get_running_loop().create_future()
                self.pending[conn_id] = fut
                self.spawn(self.send_and_echo(conn_id))
                url = await asyncio.wait_for(fut, HANDSHAKE_TIMEOUT)
                extra = []
            await splice_to_relay(kr, kw, head, url, self.ctx, extra)
        except (asyncio.TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            self.counts["failed"] += 1
            print(f"shim: {e!r}", file=sys.stderr)
        finally:
            if conn_id:
                self.pending.pop(conn_id, None)
            kw.close()

    async def run(self, kosoku_argv: list[str], out: Path, deadline: float) -> int:
        """Opens the control channel and the shim, runs kosoku against the shim, and returns
        kosoku's exit code (1 when any case did not pass, which is expected here)."""
        ready = asyncio.get_running_loop().create_future()
        control = asyncio.create_task(self.control_channel(ready))
        await asyncio.wait([control, ready], return_when=asyncio.FIRST_COMPLETED)
        if control.done():
            control.result()  # raises why the control channel failed
        server = await asyncio.start_server(self.on_kosoku, "127.0.0.1", 0, limit=HEAD_LIMIT)
        port = server.sockets[0].getsockname()[1]
        argv = [*kosoku_argv, "-o", str(out / "reports"), f"ws://127.0.0.1:{port}/"]
        print(f"{self.leg} leg: {' '.join(argv)}", file=sys.stderr, flush=True)
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL)
        waiter = asyncio.create_task(proc.wait())
        done, _ = await asyncio.wait(
            [waiter, control],
            timeout=max(1.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if waiter not in done:
            proc.kill()
            await proc.wait()
            if control in done:
                control.result()  # the relay dropped the control channel: say why
            raise SystemExit(f"{self.leg} leg: kosoku did not finish in time")
        server.close()
        control.cancel()
        for t in list(self.tasks):
            t.cancel()
        print(f"{self.leg} leg: {self.counts}", file=sys.stderr)
        return proc.returncode


# === Results ===


def case_key(case: str) -> list[int]:
    """`9.10.2` sorts after `9.9.1`."""
    return [int(p) for p in case.split(".")]


def load_results(reports: Path) -> tuple[dict[str, list[str]], dict[str, int]]:
    """kosoku's index.json (agent -> case -> entry) as case -> [behavior, behaviorClose], and
    case -> duration in ms."""
    out: dict[str, list[str]] = {}
    ms: dict[str, int] = {}
    for index in [reports / "index.json"]:
        for cases in json.loads(index.read_text()).values():
            for case, e in cases.items():
                out[case] = [e["behavior"], e["behaviorClose"]]
                ms[case] = e["duration"]
    return dict(sorted(out.items(), key=lambda kv: case_key(kv[0]))), ms


def cmd_leg(args: argparse.Namespace) -> None:
    check_token_vector()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    argv = [args.kosoku, "-p", str(args.parallelism)]
    argv += [a for c in args.include or [] for a in ("-i", c)]
    argv += [a for c in args.exclude or [] for a in ("-x", c)]
    started = time.monotonic()
    harness = Harness(args)
    code = asyncio.run(harness.run(argv, out, started + args.timeout))
    results, ms = load_results(out / "reports")
    doc = {
        "leg": args.leg,
        "seconds": round(time.monotonic() - started, 1),
        "kosoku_exit": code,
        "anomalies": anomalies,
        "slow": {c: round(v / 1000, 1) for c, v in ms.items() if v >= SLOW_MS},
        "cases": results,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{args.leg} leg: {len(results)} cases in {doc['seconds']} s", file=sys.stderr)


# Order used to say whether a changed result is better or worse.
RANK = {"ERROR": 0, "FAILED": 1, "UNIMPLEMENTED": 2, "INFORMATIONAL": 3, "NON-STRICT": 3, "OK": 4}
CLOSE_RANK = {
    "FAILED": 0,
    "FAILED BY CLIENT": 0,
    "UNCLEAN": 0,
    "WRONG CODE": 0,
    "INFORMATIONAL": 1,
    "OK": 1,
}


def fmt(r: list[str] | None) -> str:
    if r is None:
        return "missing"
    return r[0] if r[1] == "OK" else f"{r[0]} (close: {r[1]})"


def accepted(expected: dict, leg: str, case: str) -> list[list[str]]:
    """The frozen result of a case, plus the ones an `also_accepted` group allows for it
    (timing races, each explained in the group's `why` and in README.md)."""
    out = []
    if case in expected["legs"].get(leg, {}):
        out.append(expected["legs"][leg][case])
    for group in expected.get("also_accepted", []):
        if case in group["cases"]:
            out += group["results"]
    return out


def merge_legs(paths: list[str]) -> list[dict]:
    """results.json files (one per leg and phase) merged into one document per leg."""
    legs: dict[str, dict] = {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        empty = {"leg": doc["leg"], "seconds": 0.0, "anomalies": [], "slow": {}, "cases": {}}
        m = legs.setdefault(doc["leg"], empty)
        m["seconds"] = round(m["seconds"] + doc["seconds"], 1)
        m["anomalies"] += doc["anomalies"]
        m["slow"].update(doc["slow"])
        m["cases"].update(doc["cases"])
    return sorted(legs.values(), key=lambda d: d["leg"] != "sender")


def cmd_compare(args: argparse.Namespace) -> None:
    """Prints every case whose result differs from the frozen one, per leg; then TAP-style
    totals. Exit 1 on any difference, better or worse: the frozen file must stay current."""
    expected = json.loads(Path(args.expected).read_text())
    passed = failed = 0
    for doc in merge_legs(args.results):
        leg, got = doc["leg"], doc["cases"]
        want = expected["legs"].get(leg, {})
        for msg in doc["anomalies"]:
            print(f"not ok - {leg} leg: relay anomaly: {msg}")
            failed += 1
        cases = set(got) if args.subset else set(want) | set(got)
        for case in sorted(cases, key=case_key):
            w, g = want.get(case), got.get(case)
            if g is not None and g in accepted(expected, leg, case):
                passed += 1
                continue
            failed += 1
            if w is None or g is None:
                how = "changed"
            elif (RANK[g[0]], CLOSE_RANK[g[1]]) >= (RANK[w[0]], CLOSE_RANK[w[1]]):
                how = "better (run with --freeze and commit expected.json)"
            else:
                how = "REGRESSED"
            print(f"not ok - {leg} leg case {case}: {how}: expected {fmt(w)}, got {fmt(g)}")
        counts: dict[str, int] = {}
        for r in got.values():
            counts[r[0]] = counts.get(r[0], 0) + 1
        summary = ", ".join(
            f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -RANK[kv[0]])
        )
        print(f"# {leg} leg: {len(got)} cases in {doc['seconds']} s: {summary}")
        if doc["slow"]:
            slow = ", ".join(f"{c} {s} s" for c, s in doc["slow"].items())
            print(f"# {leg} leg: slow cases (30 s or more; README.md, known relay bug): {slow}")
    print(f"# pass {passed}")
    print(f"# fail {failed}")
    sys.exit(1 if failed else 0)


def cmd_freeze(args: argparse.Namespace) -> None:
    """Writes expected.json from fresh results (after a deliberate change; review the diff).
    Cases not run keep their frozen result, and so do cases whose new result is one that
    `also_accepted` allows (no churn from timing races). One line per case."""
    path = Path(args.expected)
    expected = json.loads(path.read_text()) if path.exists() else {}
    expected.setdefault("legs", {})
    for doc in merge_legs(args.results):
        frozen = expected["legs"].setdefault(doc["leg"], {})
        for case, res in doc["cases"].items():
            if case not in frozen or res not in accepted(expected, doc["leg"], case):
                frozen[case] = res
    req = " ".join((Path(__file__).parent / "requirements.txt").read_text().split())
    lines = ["{", f'  "runner": {json.dumps(req)},']
    lines.append('  "also_accepted": [')
    groups = expected.get("also_accepted", [])
    for j, group in enumerate(groups):
        comma = "," if j + 1 < len(groups) else ""
        lines.append(f"    {json.dumps(group, ensure_ascii=False)}{comma}")
    lines += ["  ],", '  "legs": {']
    order = sorted(expected["legs"], key=lambda leg: leg != "sender")
    for i, leg in enumerate(order):
        lines.append(f'    "{leg}": {{')
        items = sorted(expected["legs"][leg].items(), key=lambda kv: case_key(kv[0]))
        for j, (case, res) in enumerate(items):
            comma = "," if j + 1 < len(items) else ""
            lines.append(f'      "{case}": {json.dumps(res)}{comma}')
        lines.append("    }" + ("," if i + 1 < len(order) else ""))
    lines += ["  }", "}"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    leg = sub.add_parser("leg", help="run kosoku against one leg of the relay")
    leg.add_argument("--leg", choices=["sender", "listener"], required=True)
    leg.add_argument(
        "--relay", required=True, help="host:port of the relay (as in its certificate)"
    )
    leg.add_argument("--hc", required=True, help="hybrid connection name")
    leg.add_argument("--ca", required=True, help="the relay's CA (DATA/ca.pem)")
    leg.add_argument("--listen-cs", required=True, help="connection string with Listen rights")
    leg.add_argument("--send-cs", required=True, help="connection string with Send rights")
    leg.add_argument("--kosoku", required=True, help="path of the kosoku executable")
    leg.add_argument("--out", required=True, help="folder for reports/ and results.json")
    leg.add_argument("--parallelism", type=int, default=1, help="cases at once")
    leg.add_argument("--include", action="append", help="run only these cases (kosoku globs)")
    leg.add_argument("--exclude", action="append", help="leave these cases out (kosoku globs)")
    leg.add_argument("--timeout", type=float, default=600, help="seconds for the whole leg")
    leg.set_defaults(func=cmd_leg)
    cmp = sub.add_parser("compare", help="compare results.json files with expected.json")
    cmp.add_argument("--subset", action="store_true", help="only the cases that were run")
    cmp.add_argument("expected")
    cmp.add_argument("results", nargs="+")
    cmp.set_defaults(func=cmd_compare)
    frz = sub.add_parser("freeze", help="write expected.json from results.json files")
    frz.add_argument("expected")
    frz.add_argument("results", nargs="+")
    frz.set_defaults(func=cmd_freeze)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
