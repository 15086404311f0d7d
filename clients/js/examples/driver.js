// The lab's driver, with hubcast-client: on each `pickup`, waits, announces
// `in-transit`, waits again, and announces `delivered`, in the order's store room.
//
//   node examples/driver.js [tcp://127.0.0.1:3000] [PICKUP_MS] [DELIVER_MS] [COUNT]
import { connect } from "../src/index.js";

const [url = "tcp://127.0.0.1:3000", pickupMs = "1000", deliverMs = "3000", count] = process.argv.slice(2);
const hub = await connect(url, { name: "driver" });
const wait = (/** @type {string} */ ms) => new Promise((r) => setTimeout(r, Number(ms)));
let left = count === undefined ? Infinity : Number(count);

hub.on("pickup", async (order) => {
  await wait(pickupMs);
  console.log(`DRIVER: picked up ${order.orderID}`);
  hub.emit("in-transit", order, { room: order.store });
  await wait(deliverMs);
  console.log(`DRIVER: delivered ${order.orderID}`);
  hub.emit("delivered", order, { room: order.store });
  if (--left === 0) setTimeout(() => hub.close(), 100);
});
console.log("DRIVER: waiting for orders");
