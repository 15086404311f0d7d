// A listener written as the Node class writes it: it never says `$hello`, never
// subscribes, and must still hear every event while other clients filter.
//
// Usage: node plain-listener.js PORT COUNT
// Prints "ready" once connected, then "heard N" and exits 0 once it has COUNT events.
'use strict';

const net = require('net');

const port = Number(process.argv[2]);
const count = Number(process.argv[3]);
const socket = new net.Socket();
const names = [];
let pending = '';

setTimeout(() => {
  console.error(`FAIL: timed out with ${names.length}/${count}`);
  process.exit(1);
}, 20000).unref();

socket.connect({ port, host: '127.0.0.1' }, () => console.log('ready'));
socket.setEncoding('utf8');
socket.on('data', (data) => {
  pending += data;
  let newline;
  while ((newline = pending.indexOf('\n')) >= 0) {
    const msg = JSON.parse(pending.slice(0, newline));
    pending = pending.slice(newline + 1);
    if (msg.event.startsWith('$')) {
      console.error(`FAIL: got a control frame ${JSON.stringify(msg)}`);
      process.exit(1);
    }
    names.push(msg.event);
    if (names.length === count) {
      console.log(`heard ${names.join(',')}`);
      socket.end();
    }
  }
});
socket.on('error', (err) => {
  console.error(`FAIL: ${err.message}`);
  process.exit(1);
});
