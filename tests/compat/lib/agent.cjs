'use strict';
// Runs Microsoft's published Hybrid Connections packages (hyco-ws, hyco-https, from the npm
// registry) on behalf of a test. It is a process of its own because the test starts it with
// NODE_EXTRA_CA_CERTS=<the relay's generated CA>: TLS is verified for real, against that CA.
//
// Protocol with the test (harness.mjs), over the IPC channel:
//   test → agent  {id, op, args}            agent → test  {id, result} | {id, error}
//   agent → test  {handle, event, data}     (things that happen later, e.g. a listener's accept)
const crypto = require('crypto');
const https = require('https');

const sha256 = (b) => crypto.createHash('sha256').update(b).digest('hex');
const emit = (handle, event, data = {}) => process.send({ handle, event, data });
let nextHandle = 1;

// hyco-ws and hyco-https renew a token given as a function once an hour (a setInterval of
// 3,600,000 ms). For the renewal test the agent may be told to run that one interval faster, so
// that the packages' own renewToken messages are exercised within a test's time; the packages'
// code is used unchanged.
let renewEveryMs = null;
const realSetInterval = global.setInterval;
global.setInterval = function setInterval(fn, ms, ...rest) {
  if (renewEveryMs && ms === 3600 * 1000) ms = renewEveryMs;
  return realSetInterval.call(this, fn, ms, ...rest);
};

/** A WebSocket upgrade (wss: or https: URL) with Node's https client; resolves the status line and headers of the answer. */
function upgrade(url, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = https.request(url.replace(/^wss:/, 'https:'), {
      agent: false,
      headers: {
        Connection: 'Upgrade',
        Upgrade: 'websocket',
        'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': crypto.randomBytes(16).toString('base64'),
        ...headers,
      },
    });
    const done = (res, socket) => {
      if (socket) socket.destroy(); else res.resume();
      resolve({ status: res.statusCode, statusMessage: res.statusMessage, headers: res.headers });
    };
    req.on('upgrade', (res, socket) => done(res, socket));
    req.on('response', (res) => done(res));
    req.on('error', reject);
    req.end();
  });
}

const lowerKeys = (o) => Object.fromEntries(Object.entries(o || {}).map(([k, v]) => [k.toLowerCase(), v]));
const seOf = (token) => Number(/[?&\s]se=(\d+)/.exec(token)[1]);

const ops = {
  /** A token made by the package's own createRelayToken. */
  token({ pkg = 'hyco-ws', uri, keyName, key, seconds }) {
    return require(pkg).createRelayToken(uri, keyName, key, seconds);
  },

  /**
   * hyco-ws listener (createRelayedServer) that echoes every message back with its type.
   * The token is a function (so hyco-ws may renew it), each token valid `tokenSeconds`.
   */
  wsListener({ uri, keyName, key, tokenSeconds, renew }) {
    if (renew) renewEveryMs = renew;
    const WS = require('hyco-ws');
    const h = nextHandle++;
    let tokens = 0;
    const server = WS.createRelayedServer({
      server: uri,
      token: () => {
        const token = WS.createRelayToken(uri, keyName, key, tokenSeconds);
        emit(h, 'token', { n: ++tokens, se: seOf(token) });
        return token;
      },
    }, (ws) => {
      emit(h, 'connection');
      ws.on('message', (data, flags) => ws.send(data, { binary: !!(flags && flags.binary) }, () => {}));
      ws.on('close', (code, reason) => emit(h, 'connectionClose', { code, reason: String(reason || '') }));
      ws.on('error', (e) => emit(h, 'connectionError', { message: String(e && e.message || e) }));
    });
    server.on('listening', () => {
      emit(h, 'listening');
      server.controlChannel.on('close', (code, reason) => emit(h, 'controlClose', { code, reason: String(reason || '') }));
    });
    server.on('error', (e) => emit(h, 'error', { message: String(e && e.message || e) }));
    return { handle: h };
  },

  /**
   * hyco-ws sender: relayedConnect with a createRelayToken token, sends `bytes` random bytes as
   * binary messages of `chunk` bytes, reads until as many came back, then closes.
   */
  wsSendEcho({ uri, keyName, key, bytes, chunk }) {
    const WS = require('hyco-ws');
    const token = WS.createRelayToken(uri, keyName, key);
    const data = crypto.randomBytes(bytes);
    return new Promise((resolve, reject) => {
      const got = [];
      let n = 0;
      let extensions = [];
      const ws = WS.relayedConnect(uri, token, (client) => {
        extensions = Object.keys(client.extensions || {});
        for (let off = 0; off < bytes; off += chunk) client.send(data.subarray(off, off + chunk), { binary: true });
      });
      ws.on('message', (d, flags) => {
        if (!flags || !flags.binary) return reject(new Error('a text message came back'));
        got.push(Buffer.from(d));
        n += d.length;
        if (n >= bytes) ws.close(1000);
      });
      ws.on('close', (code) => resolve({
        sent: sha256(data), received: sha256(Buffer.concat(got)), receivedBytes: n, closeCode: code, extensions,
      }));
      ws.on('error', reject);
    });
  },

  /**
   * A bare control channel with the `ws` package (no renewal, ever). With `reject`, answers each
   * accept by rejecting it: style "node" appends statusCode/statusDescription as the Node
   * libraries do, style "dotnet" appends sb-hc-statusCode/sb-hc-statusDescription with '+' for
   * spaces as .NET's WebUtility.UrlEncode does. The style is taken from the sender's
   * X-Reject-Style header (default "node").
   */
  rawListen({ uri, token, reject }) {
    const WebSocket = require('ws');
    const h = nextHandle++;
    const ws = new WebSocket(uri, null, { headers: { ServiceBusAuthorization: token } });
    ws.on('open', () => emit(h, 'open'));
    ws.on('close', (code, reason) => emit(h, 'close', { code, reason: String(reason || '') }));
    ws.on('error', (e) => emit(h, 'error', { message: String(e && e.message || e) }));
    ws.on('message', async (text) => {
      const m = JSON.parse(text);
      emit(h, 'command', m);
      if (!m.accept || !reject) return;
      const style = lowerKeys(m.accept.connectHeaders)['x-reject-style'] || 'node';
      const { status, description } = reject[style];
      const address = style === 'dotnet'
        ? `${m.accept.address}&sb-hc-statusCode=${status}&sb-hc-statusDescription=${encodeURIComponent(description).replace(/%20/g, '+')}`
        : `${m.accept.address}&statusCode=${status}&statusDescription=${encodeURIComponent(description)}`;
      try {
        const r = await upgrade(address);
        emit(h, 'rejected', { style, status: r.status, statusMessage: r.statusMessage });
      } catch (e) {
        emit(h, 'rejected', { style, error: String(e && e.message || e) });
      }
    });
    return { handle: h };
  },

  /** hyco-ws sender (relayedConnect) that only opens: resolves { opened } or { error }. */
  wsConnect({ uri, token }) {
    const WS = require('hyco-ws');
    return new Promise((resolve) => {
      const ws = WS.relayedConnect(uri, token, (client) => { resolve({ opened: true }); client.close(1000); });
      ws.on('error', (e) => resolve({ error: String(e && e.message || e) }));
    });
  },

  /** A sender's WebSocket upgrade (connect) with Node's https client: the relay's answer. */
  upgrade({ url, headers }) {
    return upgrade(url, headers);
  },

  /**
   * hyco-https listener (createRelayedServer + listen). Paths ending in
   *   /silent  never answer;
   *   /stream  answer 200 with `stream.chunks` chunks of `stream.size` random bytes, `stream.delay` ms apart;
   *   anything else: 200, the request body echoed back (or a short text when there is none).
   * Each request is reported as a "request" event (method, url, headers, body length and hash), each
 * request rendezvous the package opens for an address-only request as a "requestChannel" event.
   */
  httpsListener({ uri, keyName, key, stream = { chunks: 5, size: 40 * 1024, delay: 150 } }) {
    const relayed = require('hyco-https');
    const h = nextHandle++;
    const server = relayed.createRelayedServer({
      server: uri,
      token: () => relayed.createRelayToken(uri, keyName, key),
    }, (req, res) => {
      const chunks = [];
      req.on('data', (c) => chunks.push(Buffer.from(c)));
      req.on('end', async () => {
        const body = Buffer.concat(chunks);
        emit(h, 'request', { method: req.method, url: req.url, headers: req.headers, bodyBytes: body.length, bodySha256: sha256(body) });
        const path = req.url.split('?')[0];
        if (path.endsWith('/silent')) return;
        res.setHeader('X-Compat-Listener', 'hyco-https');
        res.setHeader('Content-Type', 'application/octet-stream');
        if (path.endsWith('/stream')) {
          const parts = Array.from({ length: stream.chunks }, () => crypto.randomBytes(stream.size));
          res.setHeader('X-Body-Sha256', sha256(Buffer.concat(parts)));
          res.writeHead(200);
          for (const p of parts) {
            res.write(p);
            await new Promise((r) => setTimeout(r, stream.delay));
          }
          res.end();
          return;
        }
        const out = body.length ? body : Buffer.from('hello from hyco-https');
        res.setHeader('X-Body-Sha256', sha256(out));
        res.statusCode = 200;
        res.end(out);
      });
    });
    server.on('listening', () => emit(h, 'listening'));
    // A request rendezvous opened for an address-only request (one too large for the control channel).
    server.on('requestchannel', () => emit(h, 'requestChannel'));
    server.on('error', (e) => emit(h, 'error', { message: String(e && e.message || e) }));
    server.listen();
    return { handle: h };
  },

  /**
   * A plain Node https request. `body`: { bytes } random bytes sent with Content-Length, or
   * { chunks: [sizes], delay } written piecewise without a length (chunked). Resolves the status
   * line, headers, and length and hash of both bodies.
   */
  httpsRequest({ url, method = 'GET', headers = {}, body }) {
    return new Promise((resolve, reject) => {
      const parts = !body ? [] : body.chunks
        ? body.chunks.map((n) => crypto.randomBytes(n))
        : [crypto.randomBytes(body.bytes)];
      const sent = Buffer.concat(parts);
      const h = { ...headers };
      if (body && !body.chunks) h['Content-Length'] = String(sent.length);
      const req = https.request(url.replace(/^wss:/, 'https:'), { method, headers: h, agent: false }, (res) => {
        const got = [];
        res.on('data', (d) => got.push(d));
        res.on('end', () => {
          const b = Buffer.concat(got);
          resolve({
            status: res.statusCode, statusMessage: res.statusMessage, headers: res.headers,
            bodyBytes: b.length, bodySha256: sha256(b), bodyText: b.length < 2048 ? b.toString('utf8') : null,
            sentBytes: sent.length, sentSha256: sha256(sent),
          });
        });
        res.on('error', reject);
      });
      req.on('error', reject);
      (async () => {
        if (body && body.chunks) {
          for (const p of parts) {
            req.write(p);
            await new Promise((r) => setTimeout(r, body.delay || 0));
          }
          req.end();
        } else {
          req.end(sent);
        }
      })();
    });
  },
};

process.on('message', async ({ id, op, args }) => {
  try {
    if (!ops[op]) throw new Error(`unknown op ${op}`);
    process.send({ id, result: await ops[op](args) });
  } catch (e) {
    process.send({ id, error: String(e && e.stack || e) });
  }
});
process.on('disconnect', () => process.exit(0));
