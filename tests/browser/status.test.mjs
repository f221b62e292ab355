// The status pages of the relay and the manager, in a real browser, against real processes:
// relay + manager + forwarder + a TCP echo service, all on 127.0.0.1.
//
// Needs: HYCO_BIN (the hyco binary; scripts/test sets it), /usr/bin/chromium.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import net from "node:net";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const bin = process.env.HYCO_BIN || join(here, "../../target/debug/hyco");
const out = join(here, "out");
mkdirSync(out, { recursive: true });
const T = 20_000;

/** Starts a process and resolves the first stderr/stdout line matching `re`. */
function start(args, env = {}) {
  const p = spawn(bin, args, { env: { ...process.env, HYCO_LOG: "info", ...env }, stdio: ["ignore", "pipe", "pipe"] });
  const lines = [];
  const waiters = [];
  const onData = (buf) => {
    for (const l of buf.toString().split("\n")) {
      if (!l) continue;
      lines.push(l);
      for (const w of waiters.slice()) if (w.re.test(l)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(l); }
    }
  };
  p.stdout.on("data", onData);
  p.stderr.on("data", onData);
  p.waitFor = (re) => {
    const hit = lines.find((l) => re.test(l));
    if (hit) return Promise.resolve(hit);
    return new Promise((resolve, reject) => {
      waiters.push({ re, resolve });
      setTimeout(() => reject(new Error(`no line matching ${re} in ${T} ms:\n${lines.join("\n")}`)), T).unref();
    });
  };
  return p;
}

const field = (line, key) => line.match(new RegExp(`${key}=(\\S+)`))[1];
const portOf = (line, key) => Number(field(line, key).split(":").pop());

function echoServer() {
  return new Promise((resolve) => {
    const srv = net.createServer((s) => s.pipe(s));
    srv.listen(0, "127.0.0.1", () => resolve(srv));
  });
}

/** Sends `n` bytes through the forwarder and reads the echo back. */
function roundtrip(port, n) {
  return new Promise((resolve, reject) => {
    const c = net.connect(port, "127.0.0.1");
    let got = 0;
    c.on("data", (d) => { got += d.length; });
    c.on("end", () => resolve(got));
    c.on("error", reject);
    c.end(Buffer.alloc(n, 7));
  });
}

test("status pages show hybrid connections live, and a dead manager", async (t) => {
  const data = mkdtempSync(join(tmpdir(), "hyco-browser-"));
  const procs = [];
  t.after(() => procs.forEach((p) => p.kill("SIGKILL")));

  const relay = start(["relay", "--listen", "127.0.0.1:0", "--data", join(data, "d"), "--status-listen", "127.0.0.1:0"]);
  procs.push(relay);
  const relayStatus = portOf(await relay.waitFor(/status page and metrics listening/), "status");
  await relay.waitFor(/relay listening/);
  const env = {
    ...process.env,
    HYCO_CA_FILE: join(data, "d", "ca.pem"),
    HYCO_CONNECTION_STRING: readFileSync(join(data, "d", "root.connection-string"), "utf8").trim(),
  };
  const echo = await echoServer();
  t.after(() => echo.close());
  const admin = (...a) => execFileSync(bin, ["admin", ...a], { env }).toString().trim();
  admin("hc", "create", "web", "--endpoint", `127.0.0.1:${echo.address().port}`);
  const listen = admin("rule", "create", "l", "--hc", "web", "--rights", "listen");
  const send = admin("rule", "create", "s", "--hc", "web", "--rights", "send");

  const manager = start(["manager", "run", "--connection-string", listen, "--status-listen", "127.0.0.1:0"], { HYCO_CA_FILE: env.HYCO_CA_FILE, HYCO_STATE_DIR: join(data, "manager-state") });
  procs.push(manager);
  const managerStatus = portOf(await manager.waitFor(/status page and metrics listening/), "status");
  const fwd = start(["forward", "-L", "127.0.0.1:0:web", "--connection-string", send], { HYCO_CA_FILE: env.HYCO_CA_FILE });
  procs.push(fwd);
  const fwdPort = portOf(await fwd.waitFor(/forwarding/), "local");

  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  t.after(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  await page.goto(`http://127.0.0.1:${relayStatus}/`);
  const card = page.locator('[data-hc="web"]');
  const text = (f) => card.locator(`[data-field="${f}"]`).innerText();

  // Connected with one listener.
  await page.waitForFunction(() => {
    const c = document.querySelector('[data-hc="web"]');
    return c && c.querySelector('[data-field="state"]').textContent === "Connected"
      && c.querySelector('[data-field="listeners"]').textContent === "1";
  }, null, { timeout: T });
  assert.equal(await text("endpoint"), `127.0.0.1:${echo.address().port}`);
  const connectionsBefore = Number(await text("connections"));

  // Traffic moves the counters on the page.
  for (let i = 0; i < 3; i++) assert.equal(await roundtrip(fwdPort, 100_000), 100_000);
  await page.waitForFunction((before) => {
    const c = document.querySelector('[data-hc="web"]');
    return Number(c.querySelector('[data-field="connections"]').textContent) >= before + 3
      && Number(c.querySelector('[data-field="bytes"]').dataset.bytes) >= 600_000;
  }, connectionsBefore, { timeout: T });
  await page.screenshot({ path: join(out, "relay-status.png"), fullPage: true });

  // A sender without Send (a Listen key) is refused: a failure by reason.
  const badFwd = start(["forward", "-L", "127.0.0.1:0:web", "--connection-string", listen], { HYCO_CA_FILE: env.HYCO_CA_FILE });
  procs.push(badFwd);
  await roundtrip(portOf(await badFwd.waitFor(/forwarding/), "local"), 10).catch(() => 0);
  // Once the process's history holds the traffic and the failure, a page opened only now shows
  // both on its charts (not "no traffic yet" beside the bytes carried), and keeps updating.
  const deadline = Date.now() + T;
  for (;;) {
    const h = await (await fetch(`http://127.0.0.1:${relayStatus}/api/history`)).json();
    const web = h.samples.at(-1)?.hybridConnections?.web;
    if (web && web.bytes >= 600_000 && web.failures["senders refused (4xx)"] >= 1) break;
    assert.ok(Date.now() < deadline, `the history did not record the traffic: ${JSON.stringify(h.samples.at(-1))}`);
    await new Promise((r) => setTimeout(r, 250));
  }
  const later = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  await later.goto(`http://127.0.0.1:${relayStatus}/`);
  await later.waitForFunction(() => {
    const c = document.querySelector('[data-hc="web"]');
    const fig = (k) => c && c.querySelector(`[data-chart="${k}"]`);
    return fig("bytes") && Number(fig("bytes").dataset.peak) > 0
      && !fig("bytes").textContent.includes("no traffic")
      && Number(fig("failures").dataset.peak) > 0
      && fig("failures").textContent.includes("senders refused (4xx)")
      && fig("tunnels") && fig("bytes").querySelector("polyline").getAttribute("points").split(" ").length >= 2;
  }, null, { timeout: T }).catch(async (e) => {
    throw new Error(`${e.message}; the card shows: ${await later.locator('[data-hc="web"]').innerText().catch(() => "(none)")}`);
  });
  const samples = () => later.evaluate(() => Number(document.querySelector('[data-hc="web"] .charts').dataset.samples));
  const before = await samples();
  await later.waitForFunction((n) => Number(document.querySelector('[data-hc="web"] .charts').dataset.samples) > n, before, { timeout: T });
  await later.screenshot({ path: join(out, "relay-status-charts.png"), fullPage: true });

  // The manager's own page.
  const mpage = await browser.newPage({ viewport: { width: 390, height: 844 } }); // a phone
  await mpage.goto(`http://127.0.0.1:${managerStatus}/`);
  await mpage.waitForFunction(() => {
    const c = document.querySelector('[data-hc="web"]');
    return c && c.querySelector('[data-field="state"]').textContent === "Connected"
      && Number(c.querySelector('[data-field="connections"]').textContent) >= 3;
  }, null, { timeout: T });
  const overflow = await mpage.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
  assert.equal(overflow, false, "the manager page scrolls sideways on a phone");
  await mpage.screenshot({ path: join(out, "manager-status-phone.png"), fullPage: true });

  // The manager's metrics count exactly the three bridges and their bytes.
  const mm = await (await fetch(`http://127.0.0.1:${managerStatus}/metrics`)).text();
  assert.match(mm, /hyco_manager_sender_connections_success_total\{hybrid_connection="web"\} 3\b/);
  assert.match(mm, /hyco_manager_bytes_transferred_total\{hybrid_connection="web"\} 600000\b/);
  assert.match(mm, /hyco_manager_active_listeners\{hybrid_connection="web"\} 1\b/);
  assert.match(mm, /hyco_manager_connect_latency_seconds_count\{hybrid_connection="web"\} 3\b/);
  // The relay shows the listener as healthy.
  assert.equal(await card.locator('[data-field="health"]').innerText(), "healthy");

  // Kill the manager: the relay page shows no listener.
  manager.kill("SIGKILL");
  await page.waitForFunction(() => {
    const c = document.querySelector('[data-hc="web"]');
    return c.querySelector('[data-field="state"]').textContent === "No listener"
      && c.querySelector('[data-field="listeners"]').textContent === "0";
  }, null, { timeout: T });
  await page.screenshot({ path: join(out, "relay-status-manager-killed.png"), fullPage: true });

  // Metrics on the same port, with the Azure names.
  const metrics = await (await fetch(`http://127.0.0.1:${relayStatus}/metrics`)).text();
  assert.match(metrics, /hyco_sender_connections_success_total\{hybrid_connection="web"\} 3/);
  assert.match(metrics, /hyco_listener_disconnects_total\{hybrid_connection="web"\} 1/);
});
