// Swagger UI at /docs, as a person uses it: in the system's headless Chromium, the page
// lists the operations, and "Try it out" on GET /items/{id} gets the item with a 200.
//
//   node tests/conformance/docs.mjs BASE_URL [SCREENSHOT.png]
//
// BASE_URL is a running itemcache without WRITE_TOKEN (the script creates the item it
// reads). Every request the page makes must go to BASE_URL: the UI's files are served by
// the binary itself, never by a CDN.

import { chromium } from "playwright-core";

const [base, screenshot] = process.argv.slice(2);
if (!base) {
  console.error("usage: node docs.mjs BASE_URL [SCREENSHOT.png]");
  process.exit(2);
}
const STEP_MS = 15_000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  // The machine has no network but loopback: without these Chromium keeps trying to reach
  // its vendor's services (and runs as root here, hence --no-sandbox).
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
  ],
});

function fail(message) {
  throw new Error(message);
}

try {
  const page = await browser.newPage();
  page.setDefaultTimeout(STEP_MS);
  const foreign = [];
  const pageErrors = [];
  page.on("request", (request) => {
    const url = request.url();
    if (!url.startsWith(base) && !url.startsWith("data:")) foreign.push(url);
  });
  page.on("pageerror", (error) => pageErrors.push(error.message));

  const response = await page.goto(`${base}/docs`);
  if (response?.status() !== 200) fail(`GET /docs: ${response?.status()}`);

  // The operations are listed: one block per documented operation.
  const getItem = page.locator("#operations-items-get_item");
  await getItem.waitFor();
  const listed = await page.locator(".opblock").count();
  const doc = await (await page.request.get(`${base}/openapi.json`)).json();
  const documented = Object.values(doc.paths).reduce((n, item) => n + Object.keys(item).length, 0);
  if (listed !== documented) fail(`${listed} operations listed, ${documented} documented`);
  console.log(`docs: ${listed} operations listed`);

  // Try it out: GET /items/{id} of an item made for it.
  const created = await page.request.post(`${base}/items`, {
    data: { name: "Swagger UI test item", price_cents: 100 },
  });
  if (created.status() !== 201) fail(`POST /items: ${created.status()}`);
  const { id } = await created.json();
  await getItem.locator(".opblock-summary").click();
  await getItem.getByRole("button", { name: "Try it out" }).click();
  await getItem.locator('tr[data-param-name="id"] input').fill(String(id));
  await getItem.getByRole("button", { name: "Execute" }).click();
  const live = getItem.locator(".live-responses-table tbody .response");
  await live.first().waitFor();
  const status = (await live.first().locator(".response-col_status").innerText()).trim();
  if (status !== "200") fail(`Try it out on GET /items/{id}: status ${status}`);
  const body = await live.first().locator(".response-col_description pre").first().innerText();
  if (!new RegExp(`"id":\\s*${id}\\b`).test(body)) fail(`Try it out: body ${body}`);
  console.log(`docs: Try it out on GET /items/${id}: 200`);

  if (screenshot) await page.screenshot({ path: screenshot, fullPage: false });
  if (foreign.length) fail(`requests to other hosts: ${foreign.join(", ")}`);
  if (pageErrors.length) fail(`errors on the page: ${pageErrors.join("; ")}`);
} finally {
  await browser.close();
}
