// A client written the way the Node class writes its net.Socket clients, over TLS
// instead: tls.connect with the hub's CA, socket.write(JSON.stringify(msg)) with no
// delimiter, socket.on('data'). Sends one pickup, prints what comes back, exits 0.
//
// Usage: node tls-client.js PORT CA_FILE
'use strict';

const tls = require('tls');
const fs = require('fs');

const port = Number(process.argv[2]);
const ca = fs.readFileSync(process.argv[3]);

const socket = tls.connect({ host: '127.0.0.1', servername: 'localhost', port, ca }, () => {
  console.log('connected, authorized:', socket.authorized);
  const message = { event: 'pickup', payload: { from: 'node' } };
  socket.write(JSON.stringify(message));
});

let pending = '';
socket.setEncoding('utf8');
socket.on('data', (data) => {
  pending += data;
  let newline;
  while ((newline = pending.indexOf('\n')) >= 0) {
    const line = pending.slice(0, newline);
    pending = pending.slice(newline + 1);
    const event = JSON.parse(line);
    console.log('echo:', event.event);
    socket.end();
  }
});
socket.on('error', (err) => {
  console.error('error:', err.message);
  process.exit(1);
});
setTimeout(() => {
  console.error('timed out');
  process.exit(1);
}, 10000).unref();
