// BullMQ baseline for `stevedore bench`: N no-op jobs added in bulk, one
// worker process with the given concurrency, timed from the first add to the
// last completion. Run by scripts/compare/bullmq.sh.
import { Queue, Worker, QueueEvents } from "bullmq";

const jobs = Number(process.argv[2] ?? 20000);
const concurrency = Number(process.argv[3] ?? 64);
const connection = { host: "127.0.0.1", port: 6379 };
const name = `bench-${process.pid}-${Date.now()}`;

const queue = new Queue(name, { connection });
let done = 0;
let finish;
const finished = new Promise((r) => (finish = r));
const worker = new Worker(name, async () => {}, { connection, concurrency });
worker.on("completed", () => {
  done += 1;
  if (done === jobs) finish();
});
await worker.waitUntilReady();

const start = performance.now();
for (let i = 0; i < jobs; i += 500) {
  const n = Math.min(500, jobs - i);
  await queue.addBulk(Array.from({ length: n }, (_, k) => ({ name: "noop", data: { i: i + k } })));
}
const submitted = performance.now();
await finished;
const end = performance.now();
console.log(`bullmq: submitted ${jobs} in ${((submitted - start) / 1000).toFixed(2)}s; end to end ${((end - start) / 1000).toFixed(2)}s: ${Math.round(jobs / ((end - start) / 1000))} jobs/s (concurrency ${concurrency})`);
await worker.close();
await queue.obliterate({ force: true });
await queue.close();
