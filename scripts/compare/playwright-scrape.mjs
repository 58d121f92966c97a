// Playwright on this machine's Chromium, the way the Node stack it replaces
// scraped: one browser, a fresh context per page, the page's HTML read back
// after load. Serves the Moodle fixture on loopback itself, and measures
// each concurrency in the same run (the machine is noisy; figures from
// different runs do not compare).
//   node playwright-scrape.mjs [PAGES] [CONCURRENCY,...]   (default 100 1,4)
import http from "node:http";
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const pages = Number(process.argv[2] ?? 100);
const levels = String(process.argv[3] ?? "1,4").split(",").map(Number);
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

const phases = ["context", "page", "navigation", "content", "close"];
async function one(sum) {
  const t0 = performance.now();
  const ctx = await browser.newContext();
  const t1 = performance.now();
  const page = await ctx.newPage();
  const t2 = performance.now();
  await page.goto(url, { waitUntil: "load" });
  const t3 = performance.now();
  const body = await page.content();
  const t4 = performance.now();
  await ctx.close();
  const t5 = performance.now();
  if (!body.includes('type="radio"')) throw new Error("no quiz");
  [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4].forEach((d, i) => (sum[i] += d));
  return t5 - t0;
}

await one(phases.map(() => 0));
for (const concurrency of levels) {
  const lat = [];
  const sum = phases.map(() => 0);
  let next = 0;
  const started = performance.now();
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (next++ < pages) lat.push(await one(sum));
  }));
  const wall = (performance.now() - started) / 1000;
  lat.sort((a, b) => a - b);
  const p = (q) => lat[Math.min(lat.length - 1, Math.round((lat.length - 1) * q))];
  console.log(`playwright     ${String(pages).padStart(5)} pages  concurrency ${concurrency}  ${(pages / wall).toFixed(1).padStart(8)} pages/s  p50 ${p(0.5).toFixed(1).padStart(7)} ms  p99 ${p(0.99).toFixed(1).padStart(7)} ms`);
  console.log(`  mean ms per phase: ${phases.map((name, i) => `${name} ${(sum[i] / pages).toFixed(1)}`).join("  ")}`);
}
await browser.close();
server.close();
