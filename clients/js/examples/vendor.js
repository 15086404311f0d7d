// The lab's vendor, with hubcast-client: posts an order every interval as `pickup`,
// and thanks the driver for each `delivered` that comes to its store's room.
//
//   node examples/vendor.js [tcp://127.0.0.1:3000] [STORE] [COUNT] [INTERVAL_MS]
import { connect } from "../src/index.js";

const [url = "tcp://127.0.0.1:3000", store = "1-206-flowers", count = "5", every = "1000"] =
  process.argv.slice(2);
const hub = await connect(url, { name: `vendor-${store}` });
await hub.join(store); // the driver answers in the store's room

let outstanding = Number(count);
hub.on("delivered", (order) => {
  if (order.store !== store) return;
  console.log(`VENDOR: Thank you for delivering ${order.orderID}`);
  if (--outstanding === 0) {
    hub.close();
  }
});

for (let i = 0; i < Number(count); i++) {
  const order = { store, orderID: `${store}-${Date.now()}-${i}`, customer: `Customer ${i}`, address: `${i} Main St` };
  hub.emit("pickup", order);
  console.log(`VENDOR: posted ${order.orderID}`);
  await new Promise((r) => setTimeout(r, Number(every)));
}
