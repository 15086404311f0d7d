// Two clients written the way the Node class writes them (net.Socket, connect with a
// callback, socket.write(JSON.stringify(...)) with no delimiter, socket.on('data')),
// talking through the Rust hub: a vendor posts pickup orders, a driver answers each
// with in-transit and delivered. Exits 0 once every order is delivered.
//
// Usage: node lecture-clients.js PORT [ORDERS]
'use strict';

const net = require('net');

const port = Number(process.argv[2]);
const orders = Number(process.argv[3] || 50);
const host = '127.0.0.1';

// The hub sends one JSON object per line; 'data' chunks can hold several lines or part
// of one, so keep what is left over.
function onEvents(socket, handler) {
  let pending = '';
  socket.setEncoding('utf8');
  socket.on('data', (data) => {
    pending += data;
    let newline;
    while ((newline = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      handler(JSON.parse(line));
    }
  });
}

function fail(why) {
  console.error('FAIL:', why);
  process.exit(1);
}

setTimeout(() => fail('timed out'), 20000).unref();

const vendor = new net.Socket();
const driver = new net.Socket();
const delivered = new Set();
const inTransit = new Set();
let driverJoined = false;

vendor.on('error', (err) => fail(`vendor: ${err.message}`));
driver.on('error', (err) => fail(`driver: ${err.message}`));

vendor.connect({ port, host }, () => {
  console.log('vendor: connected');
  // Hearing its own echo proves the vendor is in the hub's pool.
  vendor.write(JSON.stringify({ event: 'vendor-ready', payload: {} }));
});

onEvents(vendor, (msg) => {
  if (msg.event === 'vendor-ready') {
    driver.connect({ port, host }, () => {
      driver.write(JSON.stringify({ event: 'driver-ready', payload: {} }));
    });
  } else if (msg.event === 'driver-ready' && !driverJoined) {
    driverJoined = true;
    // A burst, one write per event, no delimiter: the way the Node class writes.
    for (let i = 0; i < orders; i++) {
      const order = {
        store: 'Café Ünïcode 1-206-flowers',
        orderID: `order-${i}`,
        customer: 'Jamal Braun',
        address: `${i} Schmitt Court, Gradyfurt`,
      };
      vendor.write(JSON.stringify({ event: 'pickup', payload: order }));
    }
    // One large event, certain to arrive in many TCP segments.
    vendor.write(JSON.stringify({ event: 'manifest', payload: { notes: 'x'.repeat(200000) } }));
  } else if (msg.event === 'in-transit') {
    inTransit.add(msg.payload.orderID);
  } else if (msg.event === 'delivered') {
    if (!inTransit.has(msg.payload.orderID)) fail(`delivered before in-transit: ${msg.payload.orderID}`);
    if (msg.payload.store !== 'Café Ünïcode 1-206-flowers') fail('payload changed in transit');
    delivered.add(msg.payload.orderID);
    if (delivered.size === orders) {
      console.log(`delivered ${delivered.size}/${orders}`);
      allDelivered = true;
      vendor.end();
      // The manifest may still be on its way (the hub reads the vendor's 200 KB while
      // the driver's answers go round): the driver leaves once it has it.
      if (manifestSeen) driver.end();
    }
  } else if (msg.event === '$error') {
    fail(`hub error: ${JSON.stringify(msg.payload)}`);
  }
});

let manifestSeen = false;
let allDelivered = false;
onEvents(driver, (msg) => {
  if (msg.event === 'pickup') {
    driver.write(JSON.stringify({ event: 'in-transit', payload: msg.payload }));
    driver.write(JSON.stringify({ event: 'delivered', payload: msg.payload }));
  } else if (msg.event === 'manifest') {
    if (msg.payload.notes.length !== 200000) fail('manifest truncated');
    manifestSeen = true;
    if (allDelivered) driver.end();
  }
});

driver.on('close', (hadError) => {
  if (hadError) fail('driver closed with an error');
  if (!manifestSeen) fail('the driver never got the large manifest event');
  if (delivered.size === orders) console.log('driver: closed cleanly');
});
