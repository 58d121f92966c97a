// Playwright on this machine's Chromium, the way the Node stack it replaces
// scraped: one browser, a fresh context per page, the page's HTML read back
// after load. Serves the Moodle fixture on loopback itself.
//   node playwright-scrape.mjs [PAGES] [CONCURRENCY]
import http from "node:http";
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const pages = Number(process.argv[2] ?? 100);
const concurrency = Number(process.argv[3] ?? 4);
const html = readFileSync(new URL("../../fixtures/quiz/moodle-multichoice.html", import.meta.url));
const server = http.createServer((_, res) => {
  res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
  res.end(html);
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const url = `http://127.0.0.1:${server.address().port}/`;

const browser = await chromium.launch({
  executablePath: process.env.CHROME ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run"],
});
async function one() {
  const t = performance.now();
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  await page.goto(url, { waitUntil: "load" });
  const body = await page.content();
  await ctx.close();
  if (!body.includes('type="radio"')) throw new Error("no quiz");
  return performance.now() - t;
}
await one();
const lat = [];
let next = 0;
const started = performance.now();
await Promise.all(Array.from({ length: concurrency }, async () => {
  while (next++ < pages) lat.push(await one());
}));
const wall = (performance.now() - started) / 1000;
lat.sort((a, b) => a - b);
const p = (q) => lat[Math.min(lat.length - 1, Math.round((lat.length - 1) * q))];
console.log(`playwright     ${pages} pages  concurrency ${concurrency}  ${(pages / wall).toFixed(1)} pages/s  p50 ${p(0.5).toFixed(1)} ms  p99 ${p(0.99).toFixed(1)} ms`);
await browser.close();
server.close();
