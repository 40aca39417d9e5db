// Drives the Tether dashboard in headless Debian chromium through playwright-core (no
// bundled browser): log in with an admin JWT, see a guest connect, start a rollout and watch
// it reach 100 %, disable a plugin. Screenshots go to $ARTIFACTS.
//
// Talks to the Rust harness (tests/tests/dashboard_browser.rs) over stdio: prints
// `NEED_GUEST` and waits for a `GUEST_UP` line before looking for the guest.
//
// Env: KBS_URL, ADMIN_TOKEN, ARTIFACTS, GUEST_ID, ROLLOUT_PATH, ROLLOUT_SELECTOR,
// CHROMIUM (default /usr/bin/chromium).
import { chromium } from 'playwright-core';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const env = (k, d) => {
  const v = process.env[k] ?? d;
  if (v === undefined) throw new Error(`${k} is not set`);
  return v;
};
const base = env('KBS_URL');
const token = env('ADMIN_TOKEN');
const artifacts = env('ARTIFACTS');
const guestId = env('GUEST_ID');
const rolloutPath = env('ROLLOUT_PATH');
const rolloutSelector = env('ROLLOUT_SELECTOR', '');
const executablePath = env('CHROMIUM', '/usr/bin/chromium');
const TIMEOUT = 30_000;

mkdirSync(artifacts, { recursive: true });
const lines = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => lines.once('line', resolve));
const step = (s) => console.log(`STEP ${s}`);
const check = (cond, what) => {
  if (!cond) throw new Error(`check failed: ${what}`);
};

const userDataDir = mkdtempSync(join(tmpdir(), 'tether-chromium-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath,
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
  viewport: { width: 1400, height: 1100 },
});
let failed = false;
const page = context.pages()[0] ?? (await context.newPage());
page.setDefaultTimeout(TIMEOUT);
page.on('console', (m) => console.log(`console.${m.type()}: ${m.text()}`));
const shot = (name) => page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });

try {
  step('login page');
  const first = await page.goto(`${base}/dashboard`);
  check(first.status() === 401, `unauthenticated /dashboard is 401 (got ${first.status()})`);
  await page.locator('#token').waitFor();
  const refused = await page.evaluate(async () => (await fetch('/kbs/v0/admin/guests')).status);
  check(refused === 401, `admin API without a session is 401 (got ${refused})`);
  await shot('01-login');

  step('bad token refused');
  await page.fill('#token', 'not-a-token');
  await page.click('#login');
  await page.locator('#login-error').waitFor();

  step('log in');
  await page.fill('#token', token);
  await page.click('#login');
  await page.locator('#whoami').waitFor();
  const html = await page.content();
  check(!html.includes(token), 'the admin token is not in the page');
  check((await page.evaluate(() => document.cookie)) === '', 'the session cookie is HttpOnly');
  await shot('02-dashboard');

  step('a guest connects');
  console.log('NEED_GUEST');
  const reply = await nextLine();
  check(reply.trim() === 'GUEST_UP', `harness answered ${reply}`);
  const row = page.locator(`#guests tr[data-guest-id="${guestId}"].connected`);
  await row.waitFor();
  await shot('03-guest-connected');

  step('start a rollout and watch it reach 100 %');
  await page.fill('#rollout-path', rolloutPath);
  await page.fill('#rollout-selector', rolloutSelector);
  await page.click('#rollout-start');
  await page.locator('#rollouts tbody tr .pct', { hasText: '100 %' }).first().waitFor();
  await shot('04-rollout-done');

  step('disable a plugin');
  await page.click('#plugin-toggle-probes');
  await page
    .locator('#plugins tr[data-plugin="probes"] .state', { hasText: 'disabled' })
    .waitFor();
  const gone = await page.evaluate(
    async () =>
      (
        await fetch('/kbs/v0/probes', {
          method: 'POST',
          headers: { 'x-tether-dashboard': '1', 'content-type': 'application/json' },
          body: '{}',
        })
      ).status,
  );
  check(gone === 404, `a disabled plugin answers 404 (got ${gone})`);
  await shot('05-plugin-disabled');

  step('log out');
  await page.click('#logout');
  await page.locator('#token').waitFor();
  const after = await page.evaluate(async () => (await fetch('/kbs/v0/admin/guests')).status);
  check(after === 401, `after logout the API is 401 (got ${after})`);
  console.log('DONE');
} catch (e) {
  failed = true;
  console.error(`FAILED: ${e.stack || e}`);
  await shot('zz-failure').catch(() => {});
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
  lines.close();
}
process.exit(failed ? 1 : 0);
