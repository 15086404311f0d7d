/** What `connect` and `new Client` take. */
export interface Options {
  /** Reconnect when the connection is lost (default true), with backoff and jitter. */
  reconnect?: boolean;
  /** The first reconnect waits up to this many ms (default 100), doubling. */
  minDelay?: number;
  /** Reconnects wait at most this many ms (default 5000). */
  maxDelay?: number;
  /** Events kept while disconnected (default 1000); past it `emit` throws BufferFullError. */
  maxBuffered?: number;
  /**
   * Bytes written and not yet taken by the network past which `emit` returns false
   * (default 1 MiB); `drain` follows once they are taken.
   */
  highWaterMark?: number;
  /** A token or JWT, sent in `$hello` (hubs started with --auth or --jwt-key). */
  token?: string;
  /** The user the token belongs to (optional: a JWT names it). */
  user?: string;
  /** A name for this connection, shown in the hub's logs. */
  name?: string;
  /** Whether this connection hears its own events (default: the hub's setting). */
  echo?: boolean;
  /** Node's `tls.connect` options for tls:// and hubcasts:// (e.g. `{ ca }`). */
  tls?: object;
}

/** An event as the hub sends it. */
export interface HubEvent {
  event: string;
  payload: unknown;
  room?: string;
  id?: string;
  [field: string]: unknown;
}

/** The hub's answer to a confirmed event. */
export interface Stored {
  id: string;
  stream: string | null;
  seq?: number;
  duplicate?: boolean;
}

/** An error the hub sent (`$error`). */
export class HubError extends Error {
  /** The hub's error code, e.g. `permission_denied`. */
  readonly code: string;
  constructor(code: string, message: string);
}

/** `emit` while disconnected with the send buffer full. */
export class BufferFullError extends Error {
  constructor(limit: number);
}

/**
 * Connects (tcp://, tls://, hubcasts://, ws://, wss://); resolves once welcomed.
 * Several hubs (a cluster's nodes), as an array or separated by commas: the first
 * that answers is used, the others when it is lost.
 */
export function connect(url: string | string[], options?: Options): Promise<Client>;

export class Client {
  constructor(url: string | string[], options?: Options);
  /** The hub in use now (or being tried). */
  readonly url: URL;
  /** Resolves once the first connection is welcomed. */
  ready(): Promise<Client>;
  /** Handles events named `name`; also the lifecycle events. */
  on(name: "connect", handler: (welcome: Record<string, unknown>) => void): this;
  on(name: "reconnect", handler: (welcome: Record<string, unknown>) => void): this;
  on(name: "close", handler: (info: { hadError: boolean; error?: Error }) => void): this;
  on(name: "error", handler: (error: Error) => void): this;
  on(name: "event", handler: (event: HubEvent) => void): this;
  /** After an `emit` returned false: the waiting events are taken, send on. */
  on(name: "drain", handler: () => void): this;
  /**
   * The hub's cluster node lost the other nodes (`since`) or has them again (`until`):
   * live events from them in between may be missing.
   */
  on(name: "gap", handler: (gap: { reason: string; since?: string; until?: string }) => void): this;
  on(name: string, handler: (payload: any, event: HubEvent) => void): this;
  /** Handles every event. */
  onAny(handler: (event: HubEvent) => void): this;
  /** Like `on`, once. */
  once(name: string, handler: (...args: any[]) => void): this;
  removeListener(name: string, handler: (...args: any[]) => void): this;
  off(name: string, handler: (...args: any[]) => void): this;
  listenerCount(name: string): number;
  /**
   * Sends an event (to a room, with an id, when given). Returns false when it had to
   * wait (over `highWaterMark`, or away): stop until `drain`, as with `socket.write`.
   */
  emit(event: string, payload?: unknown, extra?: { room?: string; id?: string }): boolean;
  /** Sends an event with an id; resolves once the hub has stored it (`$stored`). */
  emitConfirmed(event: string, payload?: unknown, extra?: { room?: string; id?: string }): Promise<Stored>;
  subscribe(patterns: string | string[]): Promise<unknown>;
  unsubscribe(patterns: string | string[]): Promise<unknown>;
  join(room: string): Promise<unknown>;
  leave(room: string): Promise<unknown>;
  /** Consumes a durable stream; resolves once the hub answers `$consuming`. */
  consume(spec: ConsumeSpec): Promise<Consumer>;
  /** Stops consumer `name`'s deliveries to this connection. */
  unconsume(name: string): Promise<unknown>;
  /** Bytes written and not yet taken by the network (0 while away). */
  readonly bufferedAmount: number;
  /** Closes the connection for good (no reconnect). */
  close(): void;
}

/** What `$consume` takes (fixed by the consumer's first `$consume`). */
export interface ConsumeSpec {
  stream: string;
  consumer: string;
  filter?: string;
  room?: string;
  start?: "all" | "new" | number;
  ack_wait?: string;
  max_deliver?: number;
  max_in_flight?: number;
}

/** A stored event delivered to a consumer. */
export interface Delivery extends HubEvent {
  stream: string;
  seq: number;
  consumer: string;
  attempt: number;
  /** Done with it. */
  ack(): void;
  /** Give it back, to be delivered again (after `delay`, e.g. "5s"). */
  nack(delay?: string): void;
}

/** A durable consumer's deliveries. */
export class Consumer implements AsyncIterableIterator<Delivery> {
  readonly name: string;
  /** Events not acknowledged yet when it started, as the hub counted them. */
  pending?: number;
  next(): Promise<IteratorResult<Delivery>>;
  [Symbol.asyncIterator](): AsyncIterableIterator<Delivery>;
}
