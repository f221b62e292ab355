// HTTP mode in a real browser: a page served by nginx (Debian's package) behind `hyco manager`,
// reached at https://relay/{hc}/. Its script runs, its image loads, and its form POST goes
// through the relay and the manager to an application behind nginx and back.
//
// Needs: HYCO_BIN (the hyco binary; scripts/test sets it), /usr/bin/chromium, nginx.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, mkdirSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import http from "node:http";
import net from "node:net";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const bin = process.env.HYCO_BIN || join(here, "../../target/debug/hyco");
const out = join(here, "out");
mkdirSync(out, { recursive: true });
const T = 20_000;

function start(cmd, args, env = {}) {
  const p = spawn(cmd, args, { env: { ...process.env, HYCO_LOG: "info", ...env }, stdio: ["ignore", "pipe", "pipe"] });
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

/** A port that was free a moment ago (nginx binds it right after). */
function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => { const p = s.address().port; s.close(() => resolve(p)); });
  });
}

/** Resolves once something accepts on the port (at most T ms). */
async function accepting(port) {
  const until = Date.now() + T;
  while (Date.now() < until) {
    const ok = await new Promise((resolve) => {
      const c = net.connect(port, "127.0.0.1", () => { c.destroy(); resolve(true); });
      c.on("error", () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`nothing accepts on ${port}`);
}

// A 1×1 GIF.
const GIF = Buffer.from("R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==", "base64");

test("a page with a script, an image and a form works through relay → manager → nginx", async (t) => {
  const data = mkdtempSync(join(tmpdir(), "hyco-browser-http-"));
  const procs = [];
  t.after(() => procs.forEach((p) => p.kill("SIGKILL")));

  // The application behind nginx: answers the form.
  const app = http.createServer((req, res) => {
    let body = "";
    req.on("data", (d) => { body += d; });
    req.on("end", () => {
      const form = new URLSearchParams(body);
      res.setHeader("content-type", "text/html; charset=utf-8");
      res.end(`<!doctype html><title>thanks</title><p id="got">${req.method} ${req.url} name=${form.get("name")}</p>` +
        `<p id="fwd">${req.headers["x-forwarded-proto"]}</p>`);
    });
  });
  await new Promise((r) => app.listen(0, "127.0.0.1", r));
  t.after(() => app.close());

  // nginx: the page, its script and image, and /submit passed to the application.
  const ng = join(data, "nginx");
  for (const d of ["www", "tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"]) mkdirSync(join(ng, d), { recursive: true });
  writeFileSync(join(ng, "www/index.html"), `<!doctype html><html><head><meta charset="utf-8"><title>relayed</title>
<script src="app.js"></script></head><body>
<h1 id="title">served by nginx</h1><p id="js">script did not run</p>
<img id="logo" src="img/logo.gif" alt="logo" width="20" height="20">
<form method="post" action="submit"><input name="name" id="name"><button id="go" type="submit">send</button></form>
</body></html>`);
  writeFileSync(join(ng, "www/app.js"), `document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("js").textContent = "script ran";
});`);
  mkdirSync(join(ng, "www/img"), { recursive: true });
  writeFileSync(join(ng, "www/img/logo.gif"), GIF);
  const nport = await freePort();
  writeFileSync(join(ng, "nginx.conf"), `daemon off;
master_process off;
worker_processes 1;
pid ${ng}/nginx.pid;
error_log stderr notice;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path ${ng}/tmp/body; proxy_temp_path ${ng}/tmp/proxy;
  fastcgi_temp_path ${ng}/tmp/fastcgi; uwsgi_temp_path ${ng}/tmp/uwsgi; scgi_temp_path ${ng}/tmp/scgi;
  types { text/html html; application/javascript js; image/gif gif; }
  server {
    listen 127.0.0.1:${nport};
    root ${ng}/www;
    location = /submit { proxy_pass http://127.0.0.1:${app.address().port}; }
  }
}
`);
  const nginxBin = ["/usr/sbin/nginx", "/usr/bin/nginx"].find((p) => existsSync(p));
  assert.ok(nginxBin, "nginx is not installed");
  procs.push(start(nginxBin, ["-p", ng, "-c", join(ng, "nginx.conf"), "-e", "stderr"]));
  await accepting(nport);

  // Relay; a hybrid connection open to browsers (no token), HTTP on in its metadata; manager.
  const relay = start(bin, ["relay", "--listen", "127.0.0.1:0", "--data", join(data, "d")]);
  procs.push(relay);
  const relayPort = portOf(await relay.waitFor(/relay listening/), "listen");
  const env = {
    ...process.env,
    HYCO_CA_FILE: join(data, "d", "ca.pem"),
    HYCO_CONNECTION_STRING: readFileSync(join(data, "d", "root.connection-string"), "utf8").trim(),
  };
  const admin = (...a) => execFileSync(bin, ["admin", ...a], { env }).toString().trim();
  admin("hc", "create", "site", "--endpoint", `127.0.0.1:${nport}`, "--http", "--no-client-auth");
  const listen = admin("rule", "create", "l", "--hc", "site", "--rights", "listen");
  const manager = start(bin, ["manager", "run", "--connection-string", listen],
    { HYCO_CA_FILE: env.HYCO_CA_FILE, HYCO_STATE_DIR: join(data, "manager-state") });
  procs.push(manager);
  await manager.waitFor(/listener connected/);

  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  t.after(() => browser.close());
  // The relay's certificate comes from its own generated CA, which this browser does not know.
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await ctx.newPage();
  const base = `https://localhost:${relayPort}/site/`;
  const failed = [];
  page.on("requestfailed", (r) => failed.push(r.url()));
  const resp = await page.goto(base, { timeout: T });
  assert.equal(resp.status(), 200);
  assert.equal(await page.title(), "relayed");
  await page.waitForFunction(() => document.getElementById("js").textContent === "script ran", null, { timeout: T });
  await page.waitForFunction(() => {
    const i = document.getElementById("logo");
    return i.complete && i.naturalWidth === 1;
  }, null, { timeout: T });
  assert.deepEqual(failed, []);
  await page.screenshot({ path: join(out, "http-mode-page.png"), fullPage: true });

  // The form posts through the relay and the result page comes back.
  await page.fill("#name", "Zoë & co");
  await Promise.all([page.waitForURL(`${base}submit`, { timeout: T }), page.click("#go")]);
  assert.equal(await page.locator("#got").innerText(), "POST /submit name=Zoë & co");
  assert.equal(await page.locator("#fwd").innerText(), "https");
  await page.screenshot({ path: join(out, "http-mode-form.png"), fullPage: true });
});
