// The dashboard on a hub with --auth: it asks for a token, signs in, and shows what
// that identity may see (the counters only to an admin). Run by
// tests/integration/browser.rs:
//
//   node dashboard-auth.mjs HTTP_ADDR VIEWER_TOKEN ADMIN_TOKEN   → prints "auth-ok"
import { launch } from "./launch.mjs";

const [http, viewer, admin] = process.argv.slice(2);
const browser = await launch();
const text = (page, id) => page.evaluate((i) => document.getElementById(i).textContent, id);
async function signIn(page, user, token) {
  await page.goto(`http://${http}/`);
  // Asked for a token; the token field has the focus.
  await page.waitForSelector("#login:not(.hidden)");
  if (!(await page.evaluate(() => document.activeElement.id === "l-token"))) {
    throw new Error("the token field should have the focus");
  }
  await page.getByLabel("User (leave empty for a JWT)").fill(user);
  await page.getByLabel("Token", { exact: true }).fill(token);
  await page.keyboard.press("Enter");
  await page.waitForFunction((u) => document.getElementById("who").textContent === "signed in as " + u, user);
}
try {
  // A wrong token: asked again, with the hub's reason.
  const page = await browser.newPage();
  await page.goto(`http://${http}/`);
  await page.waitForSelector("#login:not(.hidden)");
  await page.getByLabel("Token", { exact: true }).fill("wrong");
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => !document.getElementById("login").classList.contains("hidden")
    && document.getElementById("l-note").textContent.length > 0, null, { timeout: 15000 });
  await page.close();

  // A viewer: the tail and the form, not the counters.
  const viewerPage = await browser.newPage();
  await signIn(viewerPage, "viewer", viewer);
  await viewerPage.waitForSelector("#no-stats:not(.hidden)");
  if ((await text(viewerPage, "c-clients")) !== "–") throw new Error("a viewer saw the counters");

  // An admin: the counters.
  const adminPage = await browser.newPage();
  await signIn(adminPage, "ops", admin);
  await adminPage.waitForFunction(() => /^\d/.test(document.getElementById("c-clients").textContent));
  if (await adminPage.isVisible("#no-stats")) throw new Error("the admin was told to be admin");
  console.log("auth-ok");
} finally {
  await browser.close();
}
