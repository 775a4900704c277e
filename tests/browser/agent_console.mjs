// Browser walk through logbookd's read-only console, run by
// tests/agent/console.rs (agent_console_in_a_browser) against an agent it
// started and filled. Drives Debian's Chromium headless through
// playwright-core; screenshots go to $SCREENSHOTS.
import { launch, env as makeEnv } from "./chromium.mjs";
import assert from "node:assert/strict";

const env = makeEnv("agent_console_in_a_browser");
const base = env("CONSOLE_URL");
const session = env("SESSION_ID");
const shots = env("SCREENSHOTS");

const browser = await launch();

const shot = (page, name) => page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });

try {
  const page = await (await browser.newContext({ viewport: { width: 1280, height: 800 } })).newPage();
  // Any CSP violation, failed load or script error fails the run: the
  // pages must work under their own policy.
  const problems = [];
  await page.addInitScript(() => document.addEventListener("securitypolicyviolation", (e) => console.error("CSP violation:", e.violatedDirective, e.blockedURI)));
  page.on("console", (m) => { if (m.type() === "error") problems.push(`${page.url()}: ${m.text().slice(0, 400)}`); });
  page.on("pageerror", (e) => problems.push(String(e)));
  page.on("requestfailed", (r) => problems.push(`failed to load ${r.url()}`));

  // Home: the buffer, what was dropped, the session.
  await page.goto(`${base}/`);
  await page.waitForSelector("#drops");
  assert.match(await page.textContent("#drops"), /bad input/);
  // The stylesheet applied (a level chip has its own colour, not the default).
  const styled = await page.evaluate(() => getComputedStyle(document.querySelector("header.top")).display);
  assert.notEqual(styled, "inline", "console.css is applied");
  await shot(page, "agent-01-home");

  // Open the session, then its logs.
  await page.click(`a[href="/sessions/${session}"]`);
  await page.waitForURL(`**/sessions/${session}`);
  assert.match(await page.textContent("main"), /calibration/);
  await shot(page, "agent-02-session");
  await page.click("text=/\\d+ records/");
  await page.waitForURL(/\/logs\?session=/);
  assert.equal(await page.locator("table.logs tbody tr").count(), 100);
  await shot(page, "agent-03-logs");

  // The error chip, then a search: the word is marked, markup stays text.
  await page.click("a.chip:text('error+')");
  await page.waitForURL(/level=error/);
  await page.fill("input[name=search]", "stalled");
  await page.click("button:text('Apply')");
  await page.waitForURL(/search=stalled/);
  assert.equal(await page.locator("table.logs tbody tr").count(), 1);
  assert.equal(await page.textContent("table.logs mark"), "stalled");
  assert.match(await page.textContent("table.logs td.msg"), /<script>/);
  await shot(page, "agent-04-search");

  // A permalink opens the page that starts at its line, the line targeted.
  const link = page.locator("table.logs td.num a").first();
  const seq = await link.textContent();
  await link.click();
  await page.waitForURL(new RegExp(`#l${seq}$`));
  assert.equal(await page.evaluate(() => document.querySelector(":target")?.id), `l${seq}`);

  // Back returns to the search, forward to the line.
  await page.goBack();
  await page.waitForURL(/search=stalled/);
  await page.goForward();
  await page.waitForURL(new RegExp(`#l${seq}$`));

  assert.deepEqual(problems, []);
  console.log("agent console walk: ok");
} catch (e) {
  console.error(e);
  process.exitCode = 1;
} finally {
  await browser.close();
}
