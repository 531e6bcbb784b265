// Drives the hookmesh console in a real browser: the machine's headless
// Chromium (Debian's /usr/bin/chromium) through playwright-core, which
// never downloads a browser of its own.
//
//   node tests/browser/console.mjs <admin base URL> <admin token> <screenshot dir>
//
// The host it talks to runs the handler `rec` and holds exactly one dead
// letter of it, whose payload carries a <script> element and makes `rec`
// fail. The script checks, in order: the overview shows the handler and
// the dead letter; the entry shows the payload as text (no script of it
// runs, none is in the DOM); a replay with a wrong token and one with no
// token are refused and the entry stays; a replay with the token and a
// fixed payload succeeds and the entry leaves the DLQ. It prints one JSON
// object with what it saw and exits 0, or prints the failed check and
// exits 1. Screenshots go to the directory given.

import { chromium } from "playwright-core";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [base, token, shots] = process.argv.slice(2);
if (!base || !token || !shots) {
  console.error("usage: node console.mjs <admin base URL> <admin token> <screenshot dir>");
  process.exit(2);
}
mkdirSync(shots, { recursive: true });

const seen = { checks: [] };
function check(what, ok, detail) {
  seen.checks.push(what);
  if (!ok) {
    throw new Error(`${what}${detail === undefined ? "" : `: ${detail}`}`);
  }
}

// A new, empty profile every run (playwright passes it as --user-data-dir).
const profile = mkdtempSync(join(tmpdir(), "hookmesh-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 1400, height: 1000 },
});
let failed = null;
try {
  const page = await context.newPage();
  const violations = [];
  page.on("console", (message) => {
    if (/Content Security Policy/i.test(message.text())) violations.push(message.text());
  });

  // The overview: the handler and the dead letter.
  const overview = await page.goto(`${base}/console`);
  check("the overview answers 200", overview.status() === 200, overview.status());
  const csp = overview.headers()["content-security-policy"] || "";
  check("the overview sends a strict CSP", csp.includes("default-src 'none'") && csp.includes("frame-ancestors 'none'"), csp);
  const handlers = await page.locator("table.handlers tbody tr td:first-child").allTextContents();
  check("the overview lists handler rec", handlers.includes("rec"), JSON.stringify(handlers));
  const dlqLink = page.locator("main a[href='/console/dlq']");
  check("the overview shows one dead letter", (await dlqLink.textContent()).trim().startsWith("1 dead letter"), await dlqLink.textContent());
  await page.screenshot({ path: join(shots, "console-overview.png"), fullPage: true });

  // The list, and the entry.
  await dlqLink.click();
  await page.waitForURL(/\/console\/dlq$/);
  const rows = page.locator("table.dlq tbody tr");
  check("the list has one entry", (await rows.count()) === 1, await rows.count());
  const seq = (await rows.first().locator("td").first().textContent()).trim();
  seen.seq = Number(seq);
  const filtered = await page.goto(`${base}/console/dlq?handler=rec&reason=permanent`);
  check("a filter answers 200", filtered.status() === 200, filtered.status());
  check("filtering by another reason leaves no entry", (await page.locator("table.dlq tbody tr").count()) === 0);
  await page.goto(`${base}/console/dlq?handler=rec&reason=max-deliveries&newer=1h`);
  check("filtering by its reason and age keeps it", (await page.locator("table.dlq tbody tr").count()) === 1);
  await page.locator("table.dlq tbody tr td a").first().click();
  await page.waitForURL(new RegExp(`/console/dlq/${seq}$`));

  const entryUrl = page.url();
  const payload = await page.locator("pre.payload").textContent();
  check("the payload is shown as text", payload.includes("<script>window.__pwned=1</script>"), payload);
  check("no script of the payload ran", (await page.evaluate(() => window.__pwned)) === undefined);
  const scripts = await page.evaluate(() => Array.from(document.scripts).map((s) => s.src || "inline"));
  check("the page's only script is the console's own", scripts.length === 1 && scripts[0].endsWith("/console/assets/console.js"), JSON.stringify(scripts));
  const record = await page.locator("dl.record").textContent();
  check("the failure record names the reason", record.includes("max-deliveries"), record);
  await page.screenshot({ path: join(shots, "console-dead-letter.png"), fullPage: true });

  const replay = page.locator("form.replay");
  const submit = async () => {
    await Promise.all([page.waitForNavigation(), replay.locator("button[type=submit]").click()]);
  };

  // A wrong token: refused by the host.
  await replay.locator("input[name=token]").fill("not-the-admin-token");
  await submit();
  let outcome = await page.locator("p.outcome").textContent();
  check("a replay with a wrong token is refused", outcome.includes("Refused"), outcome);

  // No token at all (past the form's own check): refused by the host.
  await page.goto(entryUrl);
  await page.evaluate(() => document.querySelector("form.replay input[name=token]").removeAttribute("required"));
  await submit();
  outcome = await page.locator("p.outcome").textContent();
  check("a replay without a token is refused", outcome.includes("Refused"), outcome);
  await page.goto(`${base}/console/dlq`);
  check("after the refusals the entry is still there", (await page.locator("table.dlq tbody tr").count()) === 1);

  // With the token and a fixed payload: replayed, the entry leaves.
  await page.goto(entryUrl);
  await replay.locator("input[name=edited]").check();
  const fixed = JSON.stringify({ type: "ticket.updated", data: { id: "T-1" }, note: "fixed in the console" }, null, 2);
  await replay.locator("textarea[name=payload]").fill(fixed);
  await replay.locator("input[name=name]").fill("browser-test");
  await replay.locator("input[name=token]").fill(token);
  await submit();
  outcome = await page.locator("p.outcome").textContent();
  check("the replay with the token succeeds", outcome.includes("ok, the entry is removed"), outcome);
  await page.screenshot({ path: join(shots, "console-replayed.png"), fullPage: true });
  await page.goto(`${base}/console/dlq`);
  check("the entry has left the DLQ", (await page.locator("table.dlq tbody tr").count()) === 0);
  check("no Content-Security-Policy violation was reported", violations.length === 0, JSON.stringify(violations));
} catch (error) {
  failed = error;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
if (failed) {
  console.log(JSON.stringify({ ok: false, failed: failed.message, ...seen }));
  process.exit(1);
}
console.log(JSON.stringify({ ok: true, ...seen }));
