// Shared plumbing of the compatibility tests: starts the hyco binary (relay, manager, forwarder),
// creates hybrid connections and keys with `hyco admin`, and starts the agent (agent.cjs), a child
// `node` process that runs Microsoft's npm packages with the relay's CA trusted through
// NODE_EXTRA_CA_CERTS. Every wait is bounded; every process started here is killed in t.after.
import { spawn, fork, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createHash } from "node:crypto";
import net from "node:net";

const here = dirname(fileURLToPath(import.meta.url));
export const bin = process.env.HYCO_BIN || join(here, "../../../target/debug/hyco");
/** Default bound of every wait, in ms. */
export const T = 20_000;

export const sha256 = (buf) => createHash("sha256").update(buf).digest("hex");
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Rejects after `ms` unless `p` settles first. */
export function within(p, ms, what) {
  let timer;
  return Promise.race([
    p,
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms); }),
  ]).finally(() => clearTimeout(timer));
}

/** Starts `hyco ARGS`, collects its log lines, and kills it (SIGKILL) when the test ends. */
export function start(t, args, env = {}) {
  // Each process gets its own state folder (a manager's control socket), never the machine's.
  const state = mkdtempSync(join(tmpdir(), "hyco-compat-state-"));
  const p = spawn(bin, args, { env: { ...process.env, HYCO_LOG: "info", HYCO_STATE_DIR: state, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  t.after(() => { p.kill("SIGKILL"); rmSync(state, { recursive: true, force: true }); });
  const lines = [];
  const waiters = [];
  let rest = "";
  const onData = (buf) => {
    const parts = (rest + buf.toString()).split("\n");
    rest = parts.pop();
    for (const l of parts) {
      if (!l) continue;
      lines.push(l);
      for (const w of waiters.slice()) if (w.re.test(l)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(l); }
    }
  };
  p.stdout.on("data", onData);
  p.stderr.on("data", onData);
  p.lines = lines;
  /** The first log line matching `re` (waiting up to `ms`). */
  p.waitFor = (re, ms = T) => {
    const hit = lines.find((l) => re.test(l));
    if (hit) return Promise.resolve(hit);
    return within(new Promise((resolve) => waiters.push({ re, resolve })), ms, `a line matching ${re} from hyco ${args[0]}:\n${lines.join("\n")}`);
  };
  return p;
}

export const field = (line, key) => line.match(new RegExp(`${key}=(\\S+)`))[1];
export const portOf = (line, key) => Number(field(line, key).split(":").pop());

/** Parses a connection string into { endpoint, keyName, key, entityPath }. */
export function parseConnectionString(cs) {
  const m = Object.fromEntries(cs.split(";").filter(Boolean).map((kv) => {
    const i = kv.indexOf("=");
    return [kv.slice(0, i), kv.slice(i + 1)];
  }));
  return { endpoint: m.Endpoint, keyName: m.SharedAccessKeyName, key: m.SharedAccessKey, entityPath: m.EntityPath };
}

/**
 * Starts a relay on 127.0.0.1:0 with its own data folder. Returns { port, host, ca, data, proc,
 * admin(...args) → stdout, hc(name, endpoint) → { listen, send } (parsed connection strings) }.
 */
export async function startRelay(t, extra = []) {
  const data = mkdtempSync(join(tmpdir(), "hyco-compat-"));
  t.after(() => rmSync(data, { recursive: true, force: true }));
  const dir = join(data, "relay");
  const proc = start(t, ["relay", "--listen", "127.0.0.1:0", "--data", dir, ...extra]);
  const port = portOf(await proc.waitFor(/relay listening/), "listen");
  const ca = join(dir, "ca.pem");
  const env = {
    ...process.env,
    HYCO_CA_FILE: ca,
    HYCO_CONNECTION_STRING: readFileSync(join(dir, "root.connection-string"), "utf8").trim(),
  };
  const admin = (...a) => execFileSync(bin, ["admin", ...a], { env, timeout: T, stdio: ["ignore", "pipe", "pipe"] }).toString().trim();
  const hc = (name, endpoint = "127.0.0.1:9") => {
    admin("hc", "create", name, "--endpoint", endpoint);
    const listen = admin("rule", "create", `${name}-listen`, "--hc", name, "--rights", "listen");
    const send = admin("rule", "create", `${name}-send`, "--hc", name, "--rights", "send");
    return { listen, send, l: parseConnectionString(listen), s: parseConnectionString(send) };
  };
  return { port, host: `localhost:${port}`, ca, data, proc, admin, hc };
}

/** `hyco forward -L 127.0.0.1:0:HC` with a Send connection string; resolves its local port. */
export async function startForwarder(t, relay, hcName, sendCs) {
  const p = start(t, ["forward", "-L", `127.0.0.1:0:${hcName}`, "--connection-string", sendCs], { HYCO_CA_FILE: relay.ca });
  p.port = portOf(await p.waitFor(/forwarding/), "local");
  return p;
}

/** A TCP echo server on 127.0.0.1:0 that also remembers the SHA-256 of what each connection sent. */
export function echoServer(t) {
  return new Promise((resolve) => {
    const received = [];
    const srv = net.createServer((s) => {
      const h = createHash("sha256");
      let n = 0;
      s.on("data", (d) => { h.update(d); n += d.length; });
      s.on("end", () => received.push({ bytes: n, sha256: h.digest("hex") }));
      s.on("error", () => {});
      s.pipe(s);
    });
    srv.received = received;
    t.after(() => srv.close());
    srv.listen(0, "127.0.0.1", () => resolve(srv));
  });
}

/** Writes `buf` to 127.0.0.1:port, half-closes, and resolves everything read until the peer's end. */
export function tcpRoundtrip(port, buf, ms = T) {
  return within(new Promise((resolve, reject) => {
    const c = net.connect(port, "127.0.0.1");
    const chunks = [];
    c.on("data", (d) => chunks.push(d));
    c.on("end", () => { resolve(Buffer.concat(chunks)); c.destroy(); });
    c.on("error", reject);
    c.end(buf);
  }), ms, `TCP round trip of ${buf.length} bytes through port ${port}`);
}

/**
 * Forks agent.cjs with NODE_EXTRA_CA_CERTS=ca. Returns { call(op, args, ms), waitEvent(name,
 * pred, ms), events(name, pred) }. Events are { event, handle, data, at } in arrival order.
 */
export function startAgent(t, ca) {
  const child = fork(join(here, "agent.cjs"), [], {
    env: { ...process.env, NODE_EXTRA_CA_CERTS: ca },
    stdio: ["ignore", "pipe", "pipe", "ipc"],
  });
  t.after(() => child.kill("SIGKILL"));
  const output = [];
  child.stdout.on("data", (d) => output.push(d.toString()));
  child.stderr.on("data", (d) => output.push(d.toString()));
  const pending = new Map();
  const events = [];
  const waiters = [];
  let nextId = 1;
  child.on("message", (m) => {
    if (m.id !== undefined) {
      const p = pending.get(m.id);
      if (!p) return;
      pending.delete(m.id);
      if (m.error) p.reject(new Error(`agent ${p.op}: ${m.error}`)); else p.resolve(m.result);
      return;
    }
    const e = { ...m, at: Date.now() };
    events.push(e);
    for (const w of waiters.slice()) if (w.match(e)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(e); }
  });
  child.on("exit", (code, signal) => {
    for (const p of pending.values()) p.reject(new Error(`agent exited (${code ?? signal}) during ${p.op}:\n${output.join("")}`));
    pending.clear();
  });
  const matcher = (name, pred) => (e) => e.event === name && (!pred || pred(e));
  return {
    output,
    call(op, args = {}, ms = T) {
      const id = nextId++;
      const p = new Promise((resolve, reject) => pending.set(id, { resolve, reject, op }));
      child.send({ id, op, args });
      return within(p, ms, `agent ${op}\n${output.join("")}`);
    },
    events: (name, pred) => events.filter(matcher(name, pred)),
    waitEvent(name, pred, ms = T) {
      const m = matcher(name, pred);
      const hit = events.find(m);
      if (hit) return Promise.resolve(hit);
      return within(new Promise((resolve) => waiters.push({ match: m, resolve })), ms,
        `agent event ${name}; events so far: ${JSON.stringify(events)}\n${output.join("")}`);
    },
    /** Resolves the n-th event named `name` (matching `pred`), waiting up to `ms`. */
    async waitCount(name, n, pred, ms = T) {
      const deadline = Date.now() + ms;
      for (;;) {
        const hits = events.filter(matcher(name, pred));
        if (hits.length >= n) return hits[n - 1];
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`timed out after ${ms} ms waiting for ${n} ${name} events; events so far: ${JSON.stringify(events)}\n${output.join("")}`);
        await this.waitEvent(name, (e) => (!pred || pred(e)) && !hits.includes(e), left).catch(() => {});
      }
    },
  };
}
