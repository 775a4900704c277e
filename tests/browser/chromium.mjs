// What both browser walks share: Debian's Chromium, headless, launched
// through playwright-core with nothing fetched from the network.
import { chromium } from "playwright-core";

export const launch = () =>
  chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });

// An environment variable the Rust test sets; `test` names it in the error.
export const env = (test) => (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (run through cargo test ${test})`);
  return v;
};
