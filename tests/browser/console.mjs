// Browser walkthrough of the operator console, run by tests/hub/console.rs
// (browser_walkthrough) against a hub it started and seeded. Drives Debian's
// Chromium headless through playwright-core; screenshots go to $SCREENSHOTS.
import { launch, env as makeEnv } from "./chromium.mjs";
import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import assert from "node:assert/strict";
import readline from "node:readline";

// The Rust side posts batches when asked: a line out, "ok" back on stdin.
const replies = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function ask(request) {
  console.log(request);
  const { value } = await replies.next();
  assert.equal(value, "ok", `the test did not do: ${request}`);
}

const env = makeEnv("browser_walkthrough");
const hub = env("HUB_URL");
const session = env("SESSION_ID");
const failed = env("FAILED_SESSION_ID");
const running = env("LIVE_SESSION_ID");
const shots = env("SCREENSHOTS");

const browser = await launch();

// Any CSP violation or script error fails the run: the console must work
// under its own policy.
function watch(page) {
  const problems = [];
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`${page.url()}: ${m.text().slice(0, 400)}`);
  });
  page.on("pageerror", (e) => problems.push(String(e)));
  page.on("dialog", (d) => problems.push(`a dialog opened: ${d.message()}`));
  return problems;
}

const shot = (page, name) => page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });

try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, acceptDownloads: true });
  const page = await context.newPage();
  await page.addInitScript(() => document.addEventListener("securitypolicyviolation", (e) => console.error("CSP violation:", e.sourceFile, e.lineNumber, e.columnNumber, e.sample, e.violatedDirective, e.target && e.target.outerHTML && e.target.outerHTML.slice(0, 200))));
  const problems = watch(page);

  // Sign in.
  await page.goto(`${hub}/`);
  await shot(page, "01-sign-in");
  await page.fill("input[name=key]", env("OPERATOR_KEY"));
  await page.click("button[type=submit]");
  await page.waitForURL(/\/o\/acme\/warehouse\/sessions$/);
  await page.getByText(session).waitFor();
  await page.getByText(failed).waitFor();
  await shot(page, "02-sessions");

  // Filter: choosing a status applies at once (console.js + htmx).
  await page.selectOption("select[name=status]", "completed");
  await page.waitForURL(/status=completed/);
  await page.getByText("1 matching").waitFor();
  assert.equal(await page.getByText(failed).count(), 0, "the failed session is filtered out");
  await shot(page, "03-sessions-filtered");
  // Back restores the unfiltered list.
  await page.goBack();
  await page.getByText("2 matching").waitFor();
  await page.goForward();
  await page.getByText("1 matching").waitFor();

  // Open the session.
  await page.click(`a:text("${session}")`);
  await page.waitForURL(new RegExp(`/sessions/${session}$`));
  await page.getByText("buffer_full").waitFor();

  // Tag it.
  await page.fill("input[name=tag][type=text]", "browser-reviewed");
  await page.click("button:text('Add tag')");
  await page.locator(".tag", { hasText: "browser-reviewed" }).waitFor();
  await shot(page, "04-session");

  // The timeline: drag across its first part opens the logs of that time.
  const over = page.locator(".timeline .u-over");
  await over.waitFor();
  await shot(page, "04-session-timeline");
  const box = await over.boundingBox();
  await page.mouse.move(box.x + 1, box.y + box.height / 2);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width * 0.3, box.y + box.height / 2, { steps: 5 });
  await page.mouse.up();
  await page.waitForURL(/\/logs\?order=asc&since=.*&until=/);
  // The range starts a pixel in (seconds after the first records): the
  // page shows the lines of the range, oldest first.
  await page.locator("table.logs tbody tr").first().waitFor();
  await page.getByText("stalled").waitFor();
  await shot(page, "05-logs-of-a-dragged-range");
  await page.goBack();
  await page.waitForURL(new RegExp(`/sessions/${session}$`));

  // Download the artifact and check its digest.
  const [download] = await Promise.all([
    page.waitForEvent("download"),
    page.click("a:text('bags/run 1.bin')"),
  ]);
  const bytes = await readFile(await download.path());
  assert.equal(createHash("sha256").update(bytes).digest("hex"), env("ARTIFACT_SHA256"));

  // An artifact uploading: the card shows its share, and polls (htmx)
  // without a reload until the upload is complete, then stops polling.
  await ask("upload: half of cam/front.mp4");
  await page.goto(`${hub}/o/acme/warehouse/sessions/${session}`);
  const uploading = page.locator("#artifacts tr.uploading", { hasText: "cam/front.mp4" });
  await uploading.getByText("uploading 50%").waitFor();
  assert.equal(await uploading.locator("progress").getAttribute("value"), "50");
  assert.equal(await page.locator("#artifacts[hx-trigger]").count(), 1, "the card polls");
  await shot(page, "04-session-uploading");
  await page.evaluate(() => { window.stillTheSamePage = true; });
  await ask("upload: the rest of cam/front.mp4");
  await page.locator("#artifacts a", { hasText: "cam/front.mp4" }).waitFor({ timeout: 20000 });
  assert.equal(await page.locator("#artifacts tr.uploading").count(), 0);
  assert.equal(await page.locator("#artifacts[hx-trigger]").count(), 0, "polling stops");
  assert.equal(await page.evaluate(() => window.stillTheSamePage), true, "no reload");
  await shot(page, "04-session-uploaded");

  // Logs: search marks the match; markup in a message stays text.
  await page.click("a.button:text-matches('^Logs')");
  await page.waitForURL(/\/logs$/);
  await page.locator("td.msg", { hasText: "<script>alert(1)</script> in a log" }).waitFor();
  await page.fill("input[name=search]", "stalled");
  await page.click("button:text('Apply')");
  await page.waitForURL(/search=stalled/);
  await page.locator("mark", { hasText: "stalled" }).waitFor();
  await page.getByText("1 matching").waitFor();
  await shot(page, "06-logs-search");
  await page.goto(`${hub}/o/acme/warehouse/sessions/${session}/logs`);
  await shot(page, "07-logs");

  // Dark scheme and a tablet-sized window.
  await page.emulateMedia({ colorScheme: "dark" });
  await page.goto(`${hub}/o/acme/warehouse/sessions/${session}`);
  await shot(page, "08-session-dark");
  await page.setViewportSize({ width: 820, height: 1180 });
  await page.goto(`${hub}/o/acme/warehouse/sessions`);
  await shot(page, "09-sessions-tablet");
  await page.emulateMedia({ colorScheme: "light" });
  await page.setViewportSize({ width: 1280, height: 800 });

  // Devices, and from there the device's sessions.
  await page.click("nav a:text('Devices')");
  await page.waitForURL(/\/devices$/);
  await page.getByText("warehouse-robot-01").waitFor();
  await shot(page, "11-devices");
  await page.click("td a:text('Sessions')");
  await page.waitForURL(/device_id=robot-1/);
  await page.getByText("2 matching").waitFor();

  // The search box finds a session by a piece of its id, in any case.
  await page.fill("input[name=search]", failed.slice(-8).toUpperCase());
  await page.press("input[name=search]", "Enter");
  await page.waitForURL(/search=/);
  await page.getByText("1 matching").waitFor();
  assert.equal(await page.getByText(session).count(), 0, "search narrows the list");
  await page.goto(`${hub}/o/acme/warehouse/sessions?device_id=robot-1`);
  await page.getByText("2 matching").waitFor();

  // Live tail: a session that starts while the list is open appears in
  // it without a reload; its new lines arrive while we watch.
  await ask("live: start a session");
  await page.locator("#session-rows a", { hasText: running }).waitFor({ timeout: 20000 });
  await shot(page, "11-sessions-live");
  await page.goto(`${hub}/o/acme/warehouse/sessions/${running}/logs`);
  await page.getByText("first live line").waitFor();
  await page.click("button:text('Follow live')");
  await page.getByText("following: new lines appear on top").waitFor();
  await ask("live: send a line");
  const sent = Date.now();
  await page.locator("tr.live td.msg", { hasText: "a live line <b>bold</b>" }).waitFor({ timeout: 5000 });
  console.log(`live: line shown after ${Date.now() - sent} ms`);
  assert.equal(await page.locator("tr.live b").count(), 0, "live text stays text");
  await page.locator("tr.live .lvl.warn").waitFor();
  await shot(page, "12-logs-live");
  await page.click("button:text('Stop following')");
  await page.locator("button:text('Follow live')").waitFor();

  // Sign out: the session's pages send back to sign-in.
  await page.click("button:text('Sign out')");
  await page.waitForURL(`${hub}/`);
  await page.goto(`${hub}/o/acme/warehouse/sessions/${session}`);
  await page.waitForURL(`${hub}/`);
  await page.locator("input[name=key]").waitFor();
  assert.deepEqual(problems, [], "no script errors or CSP violations");

  // Another organization's operator sees none of it.
  const other = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const op2 = await other.newPage();
  const problems2 = watch(op2);
  await op2.goto(`${hub}/`);
  await op2.fill("input[name=key]", env("OTHER_KEY"));
  await op2.click("button[type=submit]");
  await op2.waitForURL(/\/o\/globex\/warehouse\/sessions$/);
  await op2.getByText("0 matching").waitFor();
  assert.equal(await op2.getByText(session).count(), 0);
  for (const path of ["sessions", `sessions/${session}`, `sessions/${session}/logs`]) {
    const resp = await op2.goto(`${hub}/o/acme/warehouse/${path}`);
    assert.equal(resp.status(), 404, path);
    assert.equal(await op2.getByText("waypoint").count(), 0);
  }
  await shot(op2, "10-other-organization-404");
  assert.deepEqual(problems2.filter((p) => !p.includes("404")), []);
  console.log("console walkthrough: ok");
} catch (e) {
  console.error(e);
  process.exitCode = 1;
} finally {
  await browser.close();
  // stdin (the test's answers) would keep node alive.
  process.exit(process.exitCode ?? 0);
}
