// Debian's Chromium, as every browser test here starts it: headless, and without the
// background networking this machine's closed network would refuse (playwright-core
// never downloads a browser of its own). CHROMIUM overrides the binary.
import { chromium } from "playwright-core";

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
}
