// The delivery demo in the browser (examples/web/vendor.html): posts orders from the
// page and waits until a driver on the same hub has taken each one through
// pickup → in-transit → delivered. Run by tests/integration/browser.rs, which starts
// the hub (with --http) and `hubcast driver` over TCP.
//
//   node vendor.mjs HTTP_ADDR ORDERS   → prints "delivered N/N"
import { launch } from "./launch.mjs";
import { fileURLToPath, pathToFileURL } from "node:url";
import { join, dirname } from "node:path";

const [http, count] = [process.argv[2], Number(process.argv[3] || 3)];
const page_ = join(dirname(fileURLToPath(import.meta.url)), "../../examples/web/vendor.html");
const browser = await launch();
try {
  const page = await browser.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(String(e)));
  await page.goto(pathToFileURL(page_).href + `?hub=${http}`);
  await page.waitForFunction(() => document.getElementById("status").className === "up");
  for (let i = 0; i < count; i++) {
    await page.getByLabel("Customer").fill(`Customer ${i}`);
    await page.getByRole("button", { name: "Post order" }).click();
  }
  await page.waitForFunction((n) => document.querySelectorAll(".step.delivered.done").length === n,
    count, { timeout: 20000 });
  const transit = await page.locator(".step.in-transit.done").count();
  if (transit !== count) throw new Error(`${transit} of ${count} orders went in-transit`);
  if (problems.length) throw new Error("the page reported errors: " + problems.join("; "));
  console.log(`delivered ${count}/${count}`);
} finally {
  await browser.close();
}
