// hubcast-client: talk to a hubcast hub from Node (TCP, TLS) or a browser (WebSocket).
//
//   import { connect } from "hubcast-client";
//   const hub = await connect("tcp://127.0.0.1:3000");
//   hub.on("delivered", (payload) => console.log("delivered", payload.orderID));
//   hub.emit("pickup", { store: "1-206-flowers", orderID: 1 });
//
// The hub speaks one JSON event per line ({"event": NAME, "payload": ...}); this client
// cuts the stream into lines (two events in one chunk, or one event split over two,
// are handled), sends one line per event, answers control events, and reconnects with
// backoff and jitter, restoring its subscriptions and rooms.

/**
 * The few EventEmitter methods the client needs, without `node:events`, so that the
 * same module runs in browsers (Node's `events.once` works with it too).
 */
class Emitter {
  constructor() {
    this.listeners = new Map();
  }

  on(name, listener) {
    if (!this.listeners.has(name)) this.listeners.set(name, []);
    this.listeners.get(name).push(listener);
    return this;
  }

  addListener(name, listener) {
    return this.on(name, listener);
  }

  once(name, listener) {
    const wrapper = (...args) => {
      this.removeListener(name, wrapper);
      listener(...args);
    };
    wrapper.listener = listener;
    return this.on(name, wrapper);
  }

  removeListener(name, listener) {
    const list = this.listeners.get(name) || [];
    const at = list.findIndex((l) => l === listener || l.listener === listener);
    if (at >= 0) list.splice(at, 1);
    return this;
  }

  off(name, listener) {
    return this.removeListener(name, listener);
  }

  listenerCount(name) {
    return (this.listeners.get(name) || []).length;
  }

  emit(name, ...args) {
    const list = [...(this.listeners.get(name) || [])];
    if (name === "error" && list.length === 0) throw args[0];
    for (const listener of list) listener(...args);
    return list.length > 0;
  }
}

/** An error the hub sent (`$error`), with its code (`permission_denied`, ...). */
export class HubError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   */
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = "HubError";
    /** The hub's error code. */
    this.code = code;
  }
}

/** The send buffer kept while disconnected is full: the event was not queued. */
export class BufferFullError extends Error {
  constructor(limit) {
    super(`the client is disconnected and ${limit} events are already waiting to be sent`);
    this.name = "BufferFullError";
  }
}

/** The client's own events; any other name is a hub event. */
const LIFECYCLE = ["connect", "close", "error", "reconnect", "event", "drain", "gap"];

const DEFAULTS = {
  reconnect: true,
  minDelay: 100,
  maxDelay: 5000,
  maxBuffered: 1000,
  highWaterMark: 1024 * 1024,
  token: undefined,
  user: undefined,
  name: undefined,
  echo: undefined,
  tls: undefined,
};

/**
 * Connects to a hub: `tcp://HOST:PORT`, `tls://HOST:PORT` or `hubcasts://HOST:PORT`
 * (Node), `ws://HOST:PORT/ws` or `wss://...` (browsers, and Node where WebSocket
 * exists). Resolves once connected (and authenticated, with `token`).
 *
 * @param {string} url
 * @param {import("./index.js").Options} [options]
 * @returns {Promise<Client>}
 */
export async function connect(url, options = {}) {
  const client = new Client(url, options);
  await client.ready();
  return client;
}

/** A connection to a hub. Events: `connect`, `close`, `error`, `reconnect`, `event`. */
export class Client extends Emitter {
  /**
   * @param {string} url
   * @param {import("./index.js").Options} [options]
   */
  constructor(url, options = {}) {
    super();
    // Several hubs (the nodes of a cluster): an array, or URLs separated by commas.
    const list = Array.isArray(url) ? url : String(url).split(",");
    this.urls = list.map((u) => u.trim()).filter(Boolean).map((u) => new URL(u));
    if (this.urls.length === 0) throw new TypeError("connect needs a hub URL");
    this.current = 0; // the hub tried now, and first after a loss
    this.url = this.urls[0];
    this.options = { ...DEFAULTS, ...options };
    this.subscriptions = new Set();
    this.rooms = new Set();
    this.handlers = new Map();
    this.anyHandlers = new Set();
    this.outbox = [];
    this.requests = []; // control requests sent and not answered, oldest first
    this.consumers = new Map(); // consumer name → Consumer
    this.confirms = new Map(); // id → {resolve, reject}
    this.closed = false;
    this.attempt = 0;
    this.transport = null;
    this.connected = false;
    this.needDrain = false; // an emit returned false: `drain` is owed
    this.firstConnect = new Promise((resolve, reject) => {
      this.resolveFirst = resolve;
      this.rejectFirst = reject;
    });
    this.open();
  }

  /** Resolves once the first connection is up. */
  ready() {
    return this.firstConnect;
  }

  /**
   * Calls `handler(payload, event)` for each event named `name`.
   * @param {string} name
   * @param {(payload: any, event: object) => void} handler
   */
  on(name, handler) {
    if (LIFECYCLE.includes(name)) {
      return super.on(name, handler);
    }
    if (!this.handlers.has(name)) this.handlers.set(name, new Set());
    this.handlers.get(name).add(handler);
    return this;
  }

  removeListener(name, handler) {
    if (LIFECYCLE.includes(name)) return super.removeListener(name, handler);
    const set = this.handlers.get(name);
    for (const h of set ?? []) {
      if (h === handler || h.listener === handler) {
        set.delete(h);
        break;
      }
    }
    return this;
  }

  /** Calls `handler(event)` for every event (control events excepted). */
  onAny(handler) {
    this.anyHandlers.add(handler);
    return this;
  }

  /**
   * Sends an event. Like Node's `socket.write`, returns false when the event had to
   * wait (more than `highWaterMark` bytes not yet taken by the network, or the client
   * is away): stop sending until `drain`. Throws BufferFullError when disconnected with
   * the buffer full.
   * @param {string} event
   * @param {any} payload
   * @param {{room?: string, id?: string}} [extra]
   */
  emit(event, payload, extra) {
    if (LIFECYCLE.includes(event)) {
      return super.emit(event, payload);
    }
    const frame = { event, payload };
    if (extra && extra.room !== undefined) frame.room = extra.room;
    if (extra && extra.id !== undefined) frame.id = extra.id;
    return this.send(frame) && !this.needDrain;
  }

  /** Bytes written and not yet taken by the network (0 while away). */
  get bufferedAmount() {
    return this.connected && this.transport ? this.transport.buffered() : 0;
  }

  /**
   * Sends an event with an `id` and resolves with the hub's `$stored` answer
   * (`{id, stream, seq, duplicate?}`) once it is durable.
   */
  emitConfirmed(event, payload, extra = {}) {
    const id = extra.id ?? `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
    return new Promise((resolve, reject) => {
      this.confirms.set(id, { resolve, reject });
      try {
        this.emit(event, payload, { ...extra, id });
      } catch (e) {
        this.confirms.delete(id);
        reject(e);
      }
    });
  }

  /** Subscribes to event-name patterns; resolves with the hub's `$subscribed`. */
  subscribe(patterns) {
    const list = Array.isArray(patterns) ? patterns : [patterns];
    list.forEach((p) => this.subscriptions.add(p));
    return this.request("$subscribe", { events: list }, "$subscribed");
  }

  unsubscribe(patterns) {
    const list = Array.isArray(patterns) ? patterns : [patterns];
    list.forEach((p) => this.subscriptions.delete(p));
    return this.request("$unsubscribe", { events: list }, "$unsubscribed");
  }

  join(room) {
    this.rooms.add(room);
    return this.request("$join", { room }, "$joined");
  }

  leave(room) {
    this.rooms.delete(room);
    return this.request("$leave", { room }, "$left");
  }

  /**
   * Consumes a durable stream (`$consume`); resolves, once the hub answers
   * `$consuming`, with a Consumer: an async iterable of deliveries, each with `ack()`
   * and `nack(delay)`. Consumed again after every reconnect.
   * @param {{stream: string, consumer: string, filter?: string, room?: string,
   *   start?: "all"|"new"|number, ack_wait?: string, max_deliver?: number,
   *   max_in_flight?: number}} spec
   */
  async consume(spec) {
    if (!spec || typeof spec.stream !== "string" || typeof spec.consumer !== "string") {
      throw new TypeError("consume needs {stream, consumer} (strings)");
    }
    const consumer = new Consumer(this, { ...spec });
    this.consumers.set(spec.consumer, consumer);
    try {
      const answer = await this.request("$consume", consumer.spec, "$consuming");
      consumer.pending = answer?.pending;
      return consumer;
    } catch (e) {
      this.consumers.delete(spec.consumer);
      throw e;
    }
  }

  /** Stops deliveries of consumer `name` to this connection (`$unconsume`). */
  async unconsume(name) {
    const consumer = this.consumers.get(name);
    this.consumers.delete(name);
    consumer?.end();
    return this.request("$unconsume", { consumer: name }, "$unconsumed");
  }

  /** Closes the connection for good. */
  close() {
    this.closed = true;
    clearTimeout(this.retry);
    if (this.transport) this.transport.close();
  }

  // --- internals ---

  // Control requests are answered in order: each reply (or `$error`) settles the
  // oldest request still waiting.
  request(name, payload, reply) {
    return new Promise((resolve, reject) => {
      const waiting = { reply, resolve, reject, sent: false };
      this.requests.push(waiting);
      try {
        waiting.sent = this.send({ event: name, payload });
      } catch (e) {
        this.requests.splice(this.requests.indexOf(waiting), 1);
        reject(e);
      }
    });
  }

  /** Writes `frame` now (true), or keeps it for the next connection (false). */
  send(frame) {
    const line = JSON.stringify(frame);
    if (this.connected && this.transport) {
      this.write(this.transport, line);
      return true;
    }
    if (this.outbox.length >= this.options.maxBuffered) {
      throw new BufferFullError(this.options.maxBuffered);
    }
    this.outbox.push(line);
    this.needDrain = true;
    return false;
  }

  // Every write goes through here: past the high-water mark, `drain` is owed.
  write(transport, line) {
    transport.write(line);
    if (!this.needDrain && transport.buffered() > this.options.highWaterMark) {
      this.needDrain = true;
      transport.whenDrained(() => this.drained(transport));
    }
  }

  drained(transport) {
    if (transport !== this.transport || !this.needDrain) return;
    this.needDrain = false;
    super.emit("drain");
  }

  open() {
    this.url = this.urls[this.current];
    const transport = makeTransport(this.url, this.options);
    this.transport = transport;
    transport.onopen = () => {
      const hello = {};
      if (this.options.token !== undefined) hello.token = this.options.token;
      if (this.options.user !== undefined) hello.user = this.options.user;
      if (this.options.name !== undefined) hello.name = this.options.name;
      if (this.options.echo !== undefined) hello.echo = this.options.echo;
      // $hello first (the hub requires it first when it authenticates); resume the
      // subscriptions and rooms, then whatever waited.
      transport.write(JSON.stringify({ event: "$hello", payload: hello }));
    };
    transport.onmessage = (line) => this.receive(line);
    transport.onclose = (error) => this.lost(error);
  }

  welcomed(welcome) {
    const transport = this.transport;
    // What this client had asked for, asked again, in the order written: answers come
    // back in that order, ahead of those to requests made while away (sent next).
    const restores = [];
    const report = (e) => {
      // A restore the connection did not live to see answered is retried next time.
      if (e instanceof HubError && this.listenerCount("error") > 0) super.emit("error", e);
    };
    const restore = (name, payload, reply) => {
      restores.push({ reply, resolve() {}, reject: report, sent: true });
      this.write(transport, JSON.stringify({ event: name, payload }));
    };
    if (this.subscriptions.size > 0) restore("$subscribe", { events: [...this.subscriptions] }, "$subscribed");
    for (const room of this.rooms) restore("$join", { room }, "$joined");
    for (const consumer of this.consumers.values()) restore("$consume", consumer.spec, "$consuming");
    this.requests.unshift(...restores);
    this.connected = true;
    for (const waiting of this.requests) waiting.sent = true;
    const waited = this.needDrain;
    this.needDrain = false;
    for (const line of this.outbox.splice(0)) this.write(transport, line);
    // Events emitted while away were answered false: `drain` once they are taken.
    if (waited && !this.needDrain) {
      this.needDrain = true;
      transport.whenDrained(() => this.drained(transport));
    }
    const again = this.attempt > 0;
    this.attempt = 0;
    if (again) super.emit("reconnect", welcome);
    super.emit("connect", welcome);
    this.resolveFirst(this);
  }

  receive(line) {
    let frame;
    try {
      frame = JSON.parse(line);
    } catch {
      super.emit("error", new Error(`the hub sent something that is not JSON: ${line.slice(0, 80)}`));
      return;
    }
    const name = frame.event;
    if (name === "$welcome") return this.welcomed(frame.payload);
    if (name === "$ping") {
      this.write(this.transport, JSON.stringify({ event: "$pong", payload: frame.payload ?? null }));
      return;
    }
    if (name === "$stored") {
      const waiting = this.confirms.get(frame.payload?.id);
      if (waiting) {
        this.confirms.delete(frame.payload.id);
        waiting.resolve(frame.payload);
      }
      return;
    }
    if (name === "$error") {
      const error = new HubError(frame.payload?.code ?? "unknown", frame.payload?.message ?? "");
      const id = frame.payload?.id;
      if (id !== undefined && this.confirms.has(id)) {
        this.confirms.get(id).reject(error);
        this.confirms.delete(id);
        return;
      }
      if (!this.connected) {
        // Refused before the welcome: wrong credentials do not get better by retrying.
        this.rejectFirst(error);
        if (error.code.startsWith("auth_")) this.closed = true;
      }
      const answers = ["invalid_pattern", "invalid_room", "limit_exceeded", "permission_denied", "invalid_payload"];
      if (answers.includes(error.code) && this.requests.length > 0) {
        this.requests.shift().reject(error);
        return;
      }
      if (this.listenerCount("error") > 0) super.emit("error", error);
      return;
    }
    if (this.requests.length > 0 && this.requests[0].reply === name) {
      this.requests.shift().resolve(frame.payload);
      return;
    }
    if (name === "$gap") {
      // The hub's node lost (`since`) or found again (`until`) the rest of its cluster.
      super.emit("gap", frame.payload);
      return;
    }
    if (name.startsWith("$")) return;
    // A durable delivery goes to its consumer only.
    if (typeof frame.consumer === "string" && typeof frame.seq === "number" && this.consumers.has(frame.consumer)) {
      this.consumers.get(frame.consumer).push(frame);
      return;
    }
    for (const handler of this.handlers.get(name) ?? []) handler(frame.payload, frame);
    for (const handler of this.anyHandlers) handler(frame);
    super.emit("event", frame);
  }

  lost(error) {
    const was = this.connected;
    this.connected = false;
    this.transport = null;
    // Requests in flight are not answered now (what they asked for is restored on the
    // next connection); those still waiting to be sent go with it.
    const inFlight = this.requests.filter((w) => w.sent);
    this.requests = this.requests.filter((w) => !w.sent);
    for (const waiting of inFlight) {
      waiting.reject(error ?? new Error("the connection closed before the hub answered"));
    }
    super.emit("close", { hadError: Boolean(error), error });
    if (!was && this.attempt === 0 && !this.options.reconnect) {
      // Without reconnecting, the first connection still tries each hub once.
      this.tried = (this.tried ?? 1) + 1;
      if (this.tried <= this.urls.length && !this.closed) {
        this.current = (this.current + 1) % this.urls.length;
        this.open();
        return;
      }
      this.rejectFirst(error ?? new Error("the connection closed before the hub welcomed it"));
    }
    if (this.closed || !this.options.reconnect) {
      for (const { reject } of this.confirms.values()) reject(new Error("the connection closed"));
      this.confirms.clear();
      for (const consumer of this.consumers.values()) consumer.end();
      return;
    }
    // A hub that did not welcome us: the next one is tried (the one that was lost is
    // tried first again: it may only have restarted).
    if (!was) this.current = (this.current + 1) % this.urls.length;
    // Backoff with full jitter, from minDelay doubling to maxDelay.
    const cap = Math.min(this.options.maxDelay, this.options.minDelay * 2 ** this.attempt);
    this.attempt += 1;
    this.retry = setTimeout(() => this.open(), Math.random() * cap);
  }
}

/**
 * A durable consumer's deliveries, as an async iterable:
 *
 *   for await (const order of consumer) { ...; order.ack(); }
 *
 * Each delivery is the stored event with `stream`, `seq`, `consumer` and `attempt`,
 * plus `ack()` and `nack(delay)`. What is not acked within the consumer's `ack_wait`
 * (or when the connection drops) is delivered again.
 */
export class Consumer {
  constructor(client, spec) {
    this.client = client;
    this.spec = spec;
    this.name = spec.consumer;
    this.queue = [];
    this.waiting = [];
    this.done = false;
  }

  push(frame) {
    const client = this.client;
    const name = this.name;
    const delivery = {
      ...frame,
      ack: () => client.send({ event: "$ack", payload: { consumer: name, seq: frame.seq } }),
      nack: (delay) =>
        client.send({ event: "$nack", payload: { consumer: name, seq: frame.seq, ...(delay ? { delay } : {}) } }),
    };
    const next = this.waiting.shift();
    if (next) next({ value: delivery, done: false });
    else this.queue.push(delivery);
  }

  end() {
    this.done = true;
    for (const next of this.waiting.splice(0)) next({ value: undefined, done: true });
  }

  /** The next delivery (undefined once the consumer ended). */
  async next() {
    if (this.queue.length > 0) return { value: this.queue.shift(), done: false };
    if (this.done) return { value: undefined, done: true };
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  [Symbol.asyncIterator]() {
    return this;
  }
}

/** The line transport for a URL: TCP/TLS in Node, WebSocket elsewhere. */
function makeTransport(url, options) {
  switch (url.protocol) {
    case "tcp:":
    case "tls:":
    case "hubcasts:":
      return new StreamTransport(url, options);
    case "ws:":
    case "wss:":
      return new WebSocketTransport(url);
    default:
      throw new Error(`unsupported URL ${url.href}: use tcp://, tls://, hubcasts://, ws:// or wss://`);
  }
}

class StreamTransport {
  constructor(url, options) {
    this.buffer = "";
    this.socket = null;
    const port = Number(url.port || 3000);
    const host = url.hostname || "127.0.0.1";
    const start = async () => {
      const secure = url.protocol !== "tcp:";
      const lib = secure ? await import("node:tls") : await import("node:net");
      const socket = secure
        ? lib.connect({ host, port, servername: host, ...(options.tls || {}) })
        : lib.connect({ host, port });
      this.socket = socket;
      socket.setEncoding("utf8");
      socket.setNoDelay(true);
      socket.on(secure ? "secureConnect" : "connect", () => this.onopen?.());
      socket.on("data", (chunk) => this.data(chunk));
      let failure;
      socket.on("error", (e) => { failure = e; });
      socket.on("close", () => this.onclose?.(failure));
    };
    start().catch((e) => queueMicrotask(() => this.onclose?.(e)));
  }

  data(chunk) {
    this.buffer += chunk;
    let newline;
    while ((newline = this.buffer.indexOf("\n")) >= 0) {
      const line = this.buffer.slice(0, newline);
      this.buffer = this.buffer.slice(newline + 1);
      if (line.trim()) this.onmessage?.(line);
    }
  }

  write(line) {
    this.socket?.write(line + "\n");
  }

  buffered() {
    return this.socket?.writableLength ?? 0;
  }

  whenDrained(callback) {
    if (this.buffered() === 0) queueMicrotask(callback);
    else this.socket.once("drain", callback);
  }

  close() {
    this.socket?.end();
  }
}

class WebSocketTransport {
  constructor(url) {
    const start = async () => {
      // The runtime's own WebSocket (browsers, Node 22+), else the `ws` package if
      // it is installed (an optional peer dependency, for Node before 22).
      let Socket = globalThis.WebSocket;
      if (Socket === undefined) {
        try {
          Socket = (await import("ws")).WebSocket;
        } catch {
          throw new Error("this runtime has no WebSocket: install the `ws` package (npm install ws), or use tcp://");
        }
      }
      const ws = new Socket(url.href, "hubcast.v1");
      this.ws = ws;
      ws.onopen = () => this.onopen?.();
      ws.onmessage = (m) => this.onmessage?.(String(m.data));
      ws.onclose = (e) => this.onclose?.(e.code === 1000 ? undefined : new Error(`closed ${e.code} ${e.reason}`));
    };
    start().catch((e) => queueMicrotask(() => this.onclose?.(e)));
  }

  write(line) {
    this.ws?.send(line);
  }

  buffered() {
    return this.ws?.bufferedAmount ?? 0;
  }

  // WebSocket has no drain event: look again every few milliseconds until it is empty.
  whenDrained(callback) {
    const check = () => {
      if (this.buffered() === 0 || this.ws?.readyState !== 1) callback();
      else setTimeout(check, 5);
    };
    check();
  }

  close() {
    this.ws?.close(1000);
  }
}
