// node --test, against real hubs: the Rust binary named by HUBCAST_BIN (the cargo test
// that runs this suite sets it), else target/debug/hubcast.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import net from "node:net";
import { once } from "node:events";
import { fileURLToPath } from "node:url";
import { join, dirname } from "node:path";

import { connect, Client, HubError, BufferFullError } from "../src/index.js";

const root = join(dirname(fileURLToPath(import.meta.url)), "../../..");
const bin = process.env.HUBCAST_BIN || join(root, "target/debug/hubcast");

/** Starts `hubcast serve` on a free port (or `port`); resolves with {port, stop}. */
async function hub(args = [], port = 0) {
  const child = spawn(bin, ["serve", "--port", String(port), "--quiet", ...args], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  const lines = createInterface({ input: child.stdout });
  const [first] = await once(lines, "line");
  const match = /Server up on .*:(\d+)$/.exec(first);
  assert.ok(match, first);
  return {
    port: Number(match[1]),
    child,
    stop: async () => {
      child.kill("SIGTERM");
      await once(child, "exit");
    },
  };
}

/** Resolves with the next `name` event's payload. */
const next = (client, name) => new Promise((resolve) => {
  const handler = (payload) => {
    client.handlers.get(name).delete(handler);
    resolve(payload);
  };
  client.on(name, handler);
});

test("events go both ways, however the stream is cut", async () => {
  const h = await hub();
  const client = await connect(`tcp://127.0.0.1:${h.port}`, { reconnect: false });
  // A class-style raw socket: two events in one write, then one split in two.
  const raw = net.connect(h.port, "127.0.0.1");
  await once(raw, "connect");
  const heard = [];
  client.on("pickup", (payload) => heard.push(payload.n));
  const all = new Promise((resolve) => client.on("delivered", resolve));
  raw.write('{"event":"pickup","payload":{"n":1}}{"event":"pickup","payload":{"n":2}}\n');
  raw.write('{"event":"pickup","pay');
  await new Promise((r) => setTimeout(r, 20));
  raw.write('load":{"n":3}}\n{"event":"delivered","payload":null}\n');
  await all;
  assert.deepEqual(heard, [1, 2, 3]);
  // And from the client: the raw socket hears one line per event.
  const rawLines = createInterface({ input: raw });
  const got = new Promise((resolve) => rawLines.on("line", (l) => l.includes("in-transit") && resolve(l)));
  client.emit("in-transit", { n: 1 });
  assert.deepEqual(JSON.parse(await got), { event: "in-transit", payload: { n: 1 } });
  raw.destroy();
  client.close();
  await h.stop();
});

test("control events: subscribe, rooms, typed errors", async () => {
  const h = await hub();
  const a = await connect(`tcp://127.0.0.1:${h.port}`, { reconnect: false });
  const b = await connect(`tcp://127.0.0.1:${h.port}`, { reconnect: false, echo: false });
  const subscribed = await a.subscribe(["order.*"]);
  assert.deepEqual(subscribed, { events: ["order.*"] });
  await a.join("acme");
  const got = next(a, "order.new");
  b.emit("chat", 1); // not subscribed: not heard
  b.emit("order.new", { id: 7 });
  assert.deepEqual(await got, { id: 7 });
  const inRoom = next(a, "order.room");
  b.emit("order.room", "hi", { room: "acme" });
  assert.equal(await inRoom, "hi");
  await assert.rejects(a.subscribe(["a.>.b"]), (e) => e instanceof HubError && e.code === "invalid_pattern");
  await a.leave("acme");
  await a.unsubscribe("order.*");
  a.close();
  b.close();
  await h.stop();
});

test("reconnects after the hub restarts, restoring subscriptions and rooms", async () => {
  const first = await hub();
  const client = new Client(`tcp://127.0.0.1:${first.port}`, { minDelay: 20, maxDelay: 200 });
  await client.ready();
  await client.subscribe("news");
  await client.join("room-1");
  const closed = once(client, "close");
  await first.stop();
  await closed;
  // Sent while away: buffered, delivered after the reconnect (the hub echoes it back
  // to its sender, subscribed to `news` again: that is how it is seen to arrive).
  const heard = [];
  const both = new Promise((resolve) => {
    client.on("news", (p) => {
      heard.push(p);
      if (heard.includes("while away") && heard.includes("in the room")) resolve();
    });
  });
  client.on("other", (p) => heard.push(p));
  client.emit("news", "while away");
  const second = await hub([], first.port);
  await once(client, "reconnect");
  const peer = await connect(`tcp://127.0.0.1:${second.port}`, { reconnect: false });
  // `other` goes first on the peer's connection: were it to be heard, it would be
  // heard before "in the room".
  peer.emit("other", "not subscribed");
  peer.emit("news", "in the room", { room: "room-1" });
  await both;
  assert.deepEqual(
    [...heard].sort(),
    ["in the room", "while away"],
    "the subscription came back; `other` is not heard; nothing twice",
  );
  client.close();
  peer.close();
  await second.stop();
});

test("a bounded buffer while away fails loudly when full", async () => {
  const h = await hub();
  const client = new Client(`tcp://127.0.0.1:${h.port}`, { maxBuffered: 3, minDelay: 5000, maxDelay: 5000 });
  await client.ready();
  const closed = once(client, "close");
  await h.stop();
  await closed;
  // Kept for the next connection, so false as from a full socket: wait for `drain`.
  assert.equal(client.emit("a", 1), false);
  client.emit("a", 2);
  client.emit("a", 3);
  assert.throws(() => client.emit("a", 4), BufferFullError);
  client.close();
});

test("back-pressure: emit says when to wait, drain says when to go on, nothing is lost", async () => {
  const h = await hub();
  // A plain subscriber in the class's style, counting what arrives, in order.
  const reader = net.connect(h.port, "127.0.0.1");
  await once(reader, "connect");
  let received = 0;
  let outOfOrder = 0;
  let rest = "";
  const total = 6000;
  const allThere = new Promise((resolve) => {
    reader.setEncoding("utf8");
    reader.on("data", (chunk) => {
      const lines = (rest + chunk).split("\n");
      rest = lines.pop();
      for (const line of lines) {
        const frame = JSON.parse(line);
        if (frame.event !== "load") continue;
        if (frame.payload.n !== received) outOfOrder += 1;
        received += 1;
        if (received === total) resolve();
      }
    });
  });
  const mark = 16 * 1024;
  const client = await connect(`tcp://127.0.0.1:${h.port}`, { highWaterMark: mark, echo: false });
  const body = "x".repeat(1000);
  // The hub stops reading (SIGSTOP): once the kernel's buffers are full, what is
  // written stays in the client, and emit says so.
  h.child.kill("SIGSTOP");
  let n = 0;
  let accepted = true;
  while (accepted && n < total) accepted = client.emit("load", { n: n++, body });
  assert.equal(accepted, false, `${n} events (${n} KB) taken without back-pressure`);
  assert.ok(client.bufferedAmount > mark, `${client.bufferedAmount} bytes waiting`);
  const drained = once(client, "drain");
  h.child.kill("SIGCONT");
  await drained;
  assert.ok(client.bufferedAmount <= mark, `${client.bufferedAmount} after drain`);
  // The rest, as a well-behaved producer sends: wait for drain whenever told to.
  while (n < total) {
    if (!client.emit("load", { n: n++, body })) await once(client, "drain");
  }
  await allThere;
  assert.equal(received, total);
  assert.equal(outOfOrder, 0);
  client.close();
  reader.destroy();
  await h.stop();
});

test("several hubs: the first that answers, the next when it is lost", async () => {
  const closed = net.createServer();
  await new Promise((resolve) => closed.listen(0, "127.0.0.1", resolve));
  const dead = closed.address().port;
  await new Promise((resolve) => closed.close(resolve));
  const a = await hub();
  const b = await hub();
  // Without reconnecting, the first connection still tries each in turn.
  const once1 = await connect(`tcp://127.0.0.1:${dead},tcp://127.0.0.1:${a.port}`, { reconnect: false });
  assert.equal(once1.url.port, String(a.port));
  once1.close();
  const client = await connect([`tcp://127.0.0.1:${a.port}`, `tcp://127.0.0.1:${b.port}`], { minDelay: 10, maxDelay: 50 });
  assert.equal(client.url.port, String(a.port));
  await client.subscribe("order.*");
  const moved = once(client, "reconnect");
  await a.stop();
  await moved;
  assert.equal(client.url.port, String(b.port));
  // The subscription was restored on the other hub.
  const heard = next(client, "order.new");
  const sender = await connect(`tcp://127.0.0.1:${b.port}`);
  sender.emit("order.new", { n: 1 });
  assert.deepEqual(await heard, { n: 1 });
  sender.close();
  client.close();
  await b.stop();
});

test("emitConfirmed resolves on $stored", async () => {
  const dir = join(root, "target", `js-client-${process.pid}`);
  const h = await hub(["--stream", "orders=pickup", "--data-dir", dir, "--fsync", "never"]);
  const client = await connect(`tcp://127.0.0.1:${h.port}`, { reconnect: false });
  const stored = await client.emitConfirmed("pickup", { n: 1 });
  assert.equal(stored.stream, "orders");
  assert.equal(stored.seq, 1);
  const live = await client.emitConfirmed("chat", "not stored");
  assert.equal(live.stream, null);
  client.close();
  await h.stop();
});

test("wrong credentials reject connect with a HubError", async () => {
  const { writeFileSync, mkdirSync } = await import("node:fs");
  const { randomBytes } = await import("node:crypto");
  mkdirSync(join(root, "target"), { recursive: true });
  const key = join(root, "target", `js-jwt-${process.pid}.key`);
  writeFileSync(key, randomBytes(32).toString("hex"));
  const h = await hub(["--jwt-key", key]);
  await assert.rejects(
    connect(`tcp://127.0.0.1:${h.port}`, { token: "wrong", reconnect: false }),
    (e) => e instanceof HubError && e.code === "auth_failed",
  );
  await h.stop();
});

test("durable consume and ack, across a hub restart", async () => {
  const dir = join(root, "target", `js-consume-${process.pid}`);
  const args = ["--stream", "orders=pickup", "--data-dir", dir, "--fsync", "always"];
  const first = await hub(args);
  const client = new Client(`tcp://127.0.0.1:${first.port}`, { minDelay: 20, maxDelay: 200, echo: false });
  await client.ready();
  const drivers = await client.consume({ stream: "orders", consumer: "drivers", start: "all", ack_wait: "30s" });
  for (let n = 1; n <= 3; n++) {
    const stored = await client.emitConfirmed("pickup", { n });
    assert.equal(stored.seq, n);
  }
  // Three deliveries; two acked, one given back (delivered again, attempt 2).
  const seen = [];
  for (let i = 0; i < 3; i++) {
    const d = (await drivers.next()).value;
    assert.equal(d.stream, "orders");
    assert.equal(d.consumer, "drivers");
    assert.equal(d.attempt, 1);
    seen.push(d.payload.n);
    if (d.payload.n === 2) d.nack();
    else d.ack();
  }
  assert.deepEqual(seen, [1, 2, 3]);
  const again = (await drivers.next()).value;
  assert.deepEqual([again.payload.n, again.attempt], [2, 2]);
  // Not acked when the hub goes down: delivered again after it restarts.
  const closed = once(client, "close");
  await first.stop();
  await closed;
  const second = await hub(args, first.port);
  await once(client, "reconnect");
  const after = (await drivers.next()).value;
  assert.equal(after.payload.n, 2, "only the unacknowledged order comes back");
  assert.ok(after.attempt >= 3, `attempt ${after.attempt}`);
  after.ack();
  // A request after the restores is answered (replies are matched in order).
  await client.subscribe("other");
  await client.unconsume("drivers");
  client.close();
  await second.stop();
});

test("over WebSocket (the runtime's own, or the ws package before Node 22)", async () => {
  const child = spawn(bin, ["serve", "--port", "0", "--http", "127.0.0.1:0", "--quiet"], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  const tcpPort = /:(\d+)$/.exec((await lines.next()).value)[1];
  const http = /http:\/\/(\S+)/.exec((await lines.next()).value)[1];
  const ws = await connect(`ws://${http}/ws`, { reconnect: false, echo: false });
  const tcp = await connect(`tcp://127.0.0.1:${tcpPort}`, { reconnect: false, echo: false });
  await ws.subscribe("to-ws");
  await tcp.subscribe("to-tcp");
  const atWs = next(ws, "to-ws");
  tcp.emit("to-ws", { n: 1 });
  assert.deepEqual(await atWs, { n: 1 });
  const atTcp = next(tcp, "to-tcp");
  ws.emit("to-tcp", { n: 2 });
  assert.deepEqual(await atTcp, { n: 2 });
  ws.close();
  tcp.close();
  child.kill("SIGTERM");
  await once(child, "exit");
});
