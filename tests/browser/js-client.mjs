// hubcast-client in a real browser (Chromium), over the hub's WebSocket gateway: the
// module is served to the page as-is (no bundler) by a small HTTP server on loopback
// (Chromium blocks connections to loopback from pages that are not on it). Run by tests/integration/browser.rs, which plays the TCP side:
//
//   node js-client.mjs HTTP_ADDR   → "subscribed"; ← "send"; → "heard-and-sent"
import { launch } from "./launch.mjs";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { once } from "node:events";
import { createInterface } from "node:readline";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const http = process.argv[2];
const source = join(dirname(fileURLToPath(import.meta.url)), "../../clients/js/src/index.js");
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const browser = await launch();
try {
  const page = await browser.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(String(e)));
  const server = createServer((req, res) => {
    if (req.url === "/hubcast-client.js") {
      res.writeHead(200, { "content-type": "text/javascript" }).end(readFileSync(source, "utf8"));
    } else {
      res.writeHead(200, { "content-type": "text/html" }).end("<!doctype html><title>client</title>");
    }
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  await page.evaluate(async (hub) => {
    const { connect } = await import("/hubcast-client.js");
    window.client = await connect(`ws://${hub}/ws`, { echo: false });
    window.heard = [];
    window.client.on("from-tcp", (payload) => window.heard.push(payload));
    await window.client.subscribe("from-tcp");
  }, http);
  console.log("subscribed");
  const { value } = await lines.next();
  if (value !== "send") throw new Error(`expected "send", got ${value}`);
  await page.waitForFunction(() => window.heard.length === 1, null, { timeout: 15000 });
  const heard = await page.evaluate(() => window.heard[0]);
  if (JSON.stringify(heard) !== '{"n":1}') throw new Error(`heard ${JSON.stringify(heard)}`);
  await page.evaluate(() => window.client.emit("from-browser", { n: 2 }));
  if (problems.length) throw new Error(problems.join("; "));
  console.log("heard-and-sent");
  await page.evaluate(() => new Promise((r) => setTimeout(r, 200)));
  server.close();
} finally {
  await browser.close();
}
// stdin (the test's side of the conversation) would keep the process alive.
process.exit(0);
