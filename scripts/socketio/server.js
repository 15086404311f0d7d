// A Socket.IO 4 fan-out server, as its users write one: every "bench" event a socket
// emits is broadcast to every other socket (the in-memory adapter, one Node process).
// scripts/compare-ws starts it; `hubcast bench -t socketio://127.0.0.1:PORT` drives it.
//
//   node server.js PORT
import { createServer } from "node:http";
import { Server } from "socket.io";

const port = Number(process.argv[2] || 3300);
const http = createServer();
const io = new Server(http, {
  transports: ["websocket"],
  // The bench's messages are up to a few KiB; Socket.IO's default limit is 1 MB.
  perMessageDeflate: false,
});
io.on("connection", (socket) => {
  socket.on("bench", (payload) => socket.broadcast.emit("bench", payload));
});
http.listen(port, "127.0.0.1", () => console.log(`socket.io listening on ${port}`));
