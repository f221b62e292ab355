// Microsoft's hyco-ws package (npm, WebSocket mode) against our relay, manager and forwarder:
// real processes on 127.0.0.1, real TLS (the relay's generated CA, trusted by the agent process
// through NODE_EXTRA_CA_CERTS), nothing mocked.
//
// Needs: HYCO_BIN (scripts/test sets it), `npm install` done in tests/compat.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import {
  sha256, sleep, start, startRelay, startForwarder, startAgent, echoServer, tcpRoundtrip, within,
} from "./lib/harness.mjs";

const MiB = 1 << 20;
const listenUri = (relay, hc) => `wss://${relay.host}/$hc/${hc}?sb-hc-action=listen`;
const sendUri = (relay, hc) => `wss://${relay.host}/$hc/${hc}?sb-hc-action=connect`;

test("hyco-ws listener ↔ hyco forward: 1 MiB of TCP echoed back intact", async (t) => {
  const relay = await startRelay(t);
  const hc = relay.hc("echo");
  const agent = startAgent(t, relay.ca);
  await agent.call("wsListener", { uri: listenUri(relay, "echo"), keyName: hc.l.keyName, key: hc.l.key });
  await agent.waitEvent("listening");

  const fwd = await startForwarder(t, relay, "echo", hc.send);
  const data = randomBytes(MiB);
  const back = await tcpRoundtrip(fwd.port, data, 30_000);
  assert.equal(back.length, data.length);
  assert.equal(sha256(back), sha256(data));

  // One rendezvous, closed normally after the forwarder's half-close.
  await agent.waitEvent("connection");
  const closed = await agent.waitEvent("connectionClose");
  assert.equal(closed.data.code, 1000);
  assert.equal(agent.events("connection").length, 1);
});

test("hyco-ws sender ↔ hyco manager ↔ TCP echo service: 1 MiB both ways", async (t) => {
  const relay = await startRelay(t);
  const echo = await echoServer(t);
  const hc = relay.hc("svc", `127.0.0.1:${echo.address().port}`);
  const manager = start(t, ["manager", "run", "--connection-string", hc.listen],
    { HYCO_CA_FILE: relay.ca, HYCO_STATE_DIR: join(relay.data, "manager-state") });
  await manager.waitFor(/listener connected/);

  const agent = startAgent(t, relay.ca);
  const r = await agent.call("wsSendEcho",
    { uri: sendUri(relay, "svc"), keyName: hc.s.keyName, key: hc.s.key, bytes: MiB, chunk: 64 * 1024 }, 30_000);
  assert.equal(r.receivedBytes, MiB);
  assert.equal(r.received, r.sent, "the echo that came back differs from what was sent");
  assert.equal(r.closeCode, 1000);

  // The endpoint got exactly what the hyco-ws sender sent, and saw the end of it.
  for (let i = 0; i < 100 && echo.received.length === 0; i++) await sleep(100);
  assert.deepEqual(echo.received, [{ bytes: MiB, sha256: r.sent }]);
});

test("token renewal: relay started with --token-grace 2", { concurrency: true }, async (t) => {
  const grace = 2;
  const relay = await startRelay(t, ["--token-grace", String(grace)]);

  /** A 64 KiB TCP round trip through a forwarder to `hcName`'s hyco-ws echo listener. */
  const roundtrip = async (t2, hcName, hc) => {
    const fwd = await startForwarder(t2, relay, hcName, hc.send);
    const data = randomBytes(64 * 1024);
    const back = await tcpRoundtrip(fwd.port, data);
    assert.equal(sha256(back), sha256(data));
  };

  await Promise.all([
    t.test("hyco-ws with its renewal interval scaled to 3 s: 8 s tokens, never dropped", async (t2) => {
      const hc = relay.hc("renewing");
      const agent = startAgent(t2, relay.ca);
      await agent.call("wsListener",
        { uri: listenUri(relay, "renewing"), keyName: hc.l.keyName, key: hc.l.key, tokenSeconds: 8, renew: 3000 });
      await agent.waitEvent("listening");
      const firstSe = (await agent.waitEvent("token")).data.se;
      // Past the first token's expiry plus the grace, with margin.
      const until = firstSe * 1000 + grace * 1000 + 3000;
      await within(sleep(until - Date.now()), 20_000, "waiting past expiry + grace");
      assert.ok(agent.events("token").length >= 4, `hyco-ws renewed only ${agent.events("token").length - 1} times`);
      assert.deepEqual(agent.events("controlClose"), [], "the relay closed a control channel whose token was renewed");
      assert.equal(agent.events("listening").length, 1);
      await roundtrip(t2, "renewing", hc);
      assert.equal(agent.events("listening").length, 1);
    }),

    t.test("hyco-ws as published (renews hourly): 8 s tokens, closed with 1008, reconnects, still works", async (t2) => {
      const hc = relay.hc("reconnecting");
      const agent = startAgent(t2, relay.ca);
      await agent.call("wsListener",
        { uri: listenUri(relay, "reconnecting"), keyName: hc.l.keyName, key: hc.l.key, tokenSeconds: 8 });
      await agent.waitEvent("listening");
      const firstSe = (await agent.waitEvent("token")).data.se;
      const closed = await agent.waitEvent("controlClose", null, 25_000);
      assert.equal(closed.data.code, 1008);
      assert.ok(closed.at >= (firstSe + grace) * 1000 - 1000,
        `closed ${((firstSe + grace) * 1000 - closed.at) / 1000} s before expiry + grace`);
      assert.ok(closed.at <= (firstSe + grace) * 1000 + 5000,
        `closed ${(closed.at - (firstSe + grace) * 1000) / 1000} s after expiry + grace`);
      await agent.waitCount("listening", 2); // hyco-ws reconnected with a fresh token
      await roundtrip(t2, "reconnecting", hc);
    }),

    t.test("bare control channel that never renews: 4 s token, closed with 1008 after expiry + grace", async (t2) => {
      const hc = relay.hc("stale");
      const agent = startAgent(t2, relay.ca);
      const uri = listenUri(relay, "stale");
      const token = await agent.call("token", { uri, keyName: hc.l.keyName, key: hc.l.key, seconds: 4 });
      const se = Number(/se=(\d+)/.exec(token)[1]);
      await agent.call("rawListen", { uri, token });
      await agent.waitEvent("open");
      const closed = await agent.waitEvent("close", null, 20_000);
      assert.equal(closed.data.code, 1008);
      assert.ok(closed.at >= (se + grace) * 1000 - 1000, `closed ${((se + grace) * 1000 - closed.at) / 1000} s early`);
      assert.ok(closed.at <= (se + grace) * 1000 + 5000, `closed ${(closed.at - (se + grace) * 1000) / 1000} s late`);
    }),
  ]);
});

test("rejection: the listener's status code and reason phrase reach the sender", async (t) => {
  const relay = await startRelay(t);
  const hc = relay.hc("picky");
  const agent = startAgent(t, relay.ca);
  const uri = listenUri(relay, "picky");
  const token = await agent.call("token", { uri, keyName: hc.l.keyName, key: hc.l.key });
  const reasons = {
    node: { status: 418, description: "I'm a teapot, not a coffee pot" },
    dotnet: { status: 403, description: "Rejected by user code" },
  };
  // hyco-ws has no working reject (its abortConnection calls an undefined WebSocketClient), so
  // the listener is a bare control channel that rejects the way the Node libraries' code would.
  await agent.call("rawListen", { uri, token, reject: reasons });
  await agent.waitEvent("open");

  const connect = `https://${relay.host}/$hc/picky?sb-hc-action=connect`;
  const sendToken = await agent.call("token", { uri: sendUri(relay, "picky"), keyName: hc.s.keyName, key: hc.s.key });

  // Node style: &statusCode=418&statusDescription=… (no sb-hc- prefix).
  const r = await agent.call("upgrade", { url: connect, headers: { ServiceBusAuthorization: sendToken } });
  assert.equal(r.status, 418);
  assert.equal(r.statusMessage, reasons.node.description);
  const nodeReject = await agent.waitEvent("rejected", (e) => e.data.style === "node");
  assert.equal(nodeReject.data.status, 410, "the relay should answer a delivered reject with 410 Gone");

  // .NET style: &sb-hc-statusCode=403&sb-hc-statusDescription=Rejected+by+user+code.
  const r2 = await agent.call("upgrade",
    { url: connect, headers: { ServiceBusAuthorization: sendToken, "X-Reject-Style": "dotnet" } });
  assert.equal(r2.status, 403);
  assert.equal(r2.statusMessage, reasons.dotnet.description);
  assert.equal((await agent.waitEvent("rejected", (e) => e.data.style === "dotnet")).data.status, 410);

  // And the hyco-ws sender itself fails with the listener's status (ws 1.x reports only the code).
  const w = await agent.call("wsConnect", { uri: sendUri(relay, "picky"), token: sendToken });
  assert.equal(w.opened, undefined);
  assert.match(w.error, /\b418\b/);
  assert.equal(agent.events("rejected").length, 3);
});
