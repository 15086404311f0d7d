// Checked by `npm run typecheck` (tsc --noEmit), never run: every call of the
// client's API as a TypeScript user writes it, against src/index.d.ts. The
// `@ts-expect-error` lines must fail to type-check (tsc reports them if they do not).
import { connect, Client, HubError, BufferFullError } from "../src/index.js";
import type { Consumer, Delivery, HubEvent, Options, Stored } from "../src/index.js";

export async function everyCall(): Promise<void> {
  const options: Options = { token: "t", user: "u", name: "n", echo: false, maxBuffered: 10, highWaterMark: 1024 };
  const hub: Client = await connect("tcp://127.0.0.1:3000", options);
  hub.on("connect", (welcome) => welcome["id"]);
  hub.on("reconnect", (welcome) => welcome["id"]);
  hub.on("close", ({ hadError, error }) => (hadError ? error?.message : undefined));
  hub.on("error", (error) => (error instanceof HubError ? error.code : error.message));
  hub.on("event", (event: HubEvent) => event.event);
  hub.on("drain", () => undefined);
  hub.on("gap", (gap) => gap.since ?? gap.until);
  hub.on("delivered", (payload, event) => [payload.orderID, event.room]);
  hub.onAny((event) => event.payload);
  const sent: boolean = hub.emit("pickup", { orderID: 1 }, { room: "acme", id: "o-1" });
  const waiting: number = hub.bufferedAmount;
  const stored: Stored = await hub.emitConfirmed("pickup", { orderID: 2 });
  const seq: number | undefined = stored.seq;
  await hub.subscribe(["order.*", ">"]);
  await hub.unsubscribe("order.*");
  await hub.join("acme");
  await hub.leave("acme");
  const orders: Consumer = await hub.consume({ stream: "orders", consumer: "drivers", start: "all", ack_wait: "30s", max_deliver: 5, max_in_flight: 10 });
  for await (const order of orders) {
    const d: Delivery = order;
    const at: number = d.seq + d.attempt;
    d.ack();
    d.nack("5s");
    void at;
  }
  await hub.unconsume("drivers");
  hub.close();
  const manual = new Client("ws://127.0.0.1:8080/ws");
  await manual.ready();
  void [sent, waiting, seq, new BufferFullError(3)];

  // @ts-expect-error an event name is a string
  hub.emit(42, {});
  // @ts-expect-error consume needs a consumer name
  await hub.consume({ stream: "orders" });
  // @ts-expect-error start is "all", "new" or a sequence number
  await hub.consume({ stream: "orders", consumer: "c", start: "first" });
  // @ts-expect-error no such option
  await connect("tcp://127.0.0.1:3000", { retries: 3 });
}
