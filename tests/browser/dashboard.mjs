// Drives the hubcast dashboard in a real browser (Debian's Chromium, through
// playwright-core; nothing is downloaded). Run by tests/integration/browser.rs, which
// starts the hub and plays the TCP side; the two talk over this script's stdin and
// stdout, one word per line:
//
//   node dashboard.mjs HTTP_ADDR SCREENSHOT_DIR
//   → loaded          the page is up and live over /ws
//   → charts-moving   events/s > 0 and the chart's pixels changed between two frames
//   → published       the form sent {"event":"from-browser","payload":{"n":42}}
//   ← tail            (the test sent "from-tcp" from a TCP client)
//   → tail-ok         the tail shows it; a paused tail holds new events back
//   → screenshots     dashboard-1280x800.png and dashboard-390x844.png written
import { launch } from "./launch.mjs";
import { createInterface } from "node:readline";
import { join } from "node:path";

const [http, shots] = process.argv.slice(2);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (word) => process.stdout.write(word + "\n");
const expectLine = async (word) => {
  const { value } = await lines.next();
  if (value !== word) throw new Error(`expected "${word}" from the test, got ${JSON.stringify(value)}`);
};

const browser = await launch();
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const problems = [];
  page.on("pageerror", (e) => problems.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") problems.push(m.text()); });
  await page.goto(`http://${http}/`);
  await page.waitForFunction(() => document.getElementById("status").textContent === "live");
  say("loaded");

  // The test is sending events now: the rate card and the chart must move.
  await page.waitForFunction(() => Number(document.getElementById("c-in").textContent.replace(/[^0-9.]/g, "")) > 0,
    null, { timeout: 15000 });
  const pixels = () => page.evaluate(() => document.getElementById("rate").toDataURL());
  const before = await pixels();
  await page.waitForFunction((b) => document.getElementById("rate").toDataURL() !== b, before, { timeout: 15000 });
  say("charts-moving");

  // Publish from the form, with the keyboard: fields by label, Enter submits.
  await page.getByLabel("Event", { exact: true }).fill("from-browser");
  await page.getByLabel("Payload (JSON)", { exact: true }).fill('{"n": 42}');
  await page.getByLabel("Event", { exact: true }).press("Enter");
  await page.waitForFunction(() => document.getElementById("p-note").textContent === "sent from-browser");
  say("published");

  await expectLine("tail");
  await page.waitForFunction(() => document.getElementById("tail").textContent.includes("from-tcp"),
    null, { timeout: 15000 });
  // Paused, new events are counted, not shown.
  await page.getByRole("button", { name: "Pause" }).click();
  const shown = await page.locator("#tail > div").count();
  await page.waitForFunction(() => document.getElementById("tail-note").textContent.includes("not shown"),
    null, { timeout: 15000 });
  if ((await page.locator("#tail > div").count()) !== shown) throw new Error("the paused tail grew");
  await page.getByRole("button", { name: "Resume" }).click();
  say("tail-ok");

  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: join(shots, "dashboard-1280x800.png") });
  await page.setViewportSize({ width: 390, height: 844 });
  // Nothing wider than the phone's screen.
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 0) throw new Error(`the page is ${overflow}px wider than a 390px screen`);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: join(shots, "dashboard-390x844.png") });
  say("screenshots");
  if (problems.length) throw new Error("the page reported errors: " + problems.join("; "));
} finally {
  await browser.close();
}
process.exit(0);
