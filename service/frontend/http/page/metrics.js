// The live panel: the service's /metrics read every few seconds, the Prometheus text parsed
// here (no library in a browser), and small bar charts of the last readings.

import { $, call, errorMessage } from "./api.js";
import { ms } from "./cards.js";

const EVERY_MS = 3000;
const POINTS = 40;
// Every request a model version answered, over all models and versions.
const REQUESTS = "cnn_model_request_duration_seconds";
const history = { rate: [], latency: [], batch: [], queue: [] };
let previous = null;

/** Read /metrics now and every few seconds, unless the service serves it on another port. */
export async function watchMetrics() {
  if (await poll()) setTimeout(watchMetrics, EVERY_MS);
}

/** Parse the Prometheus text format: [{name, labels, value}], comments skipped. */
export function parseMetrics(text) {
  const samples = [];
  const sample = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/;
  const label = /([A-Za-z_]\w*)="((?:[^"\\]|\\.)*)"/g;
  for (const line of text.split("\n")) {
    const match = line.startsWith("#") ? null : sample.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] || "").matchAll(label)) {
      labels[key] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: number(match[3]) });
  }
  return samples;
}

/** Estimate a quantile from cumulative bucket counts, as Prometheus's histogram_quantile. */
export function quantile(q, counts) {
  const all = counts.length ? counts[counts.length - 1][1] : 0;
  if (!all) return null;
  const rank = q * all;
  let [lower, below] = [0, 0];
  for (const [le, count] of counts) {
    if (count >= rank) {
      if (le === Infinity) return lower;
      return lower + ((le - lower) * (rank - below)) / Math.max(count - below, 1e-12);
    }
    [lower, below] = [le, count];
  }
  return lower;
}

const number = (text) => Number(text.replace("Inf", "Infinity"));

/** Sum the samples named `name`, over every label set (every model and version). */
function total(samples, name) {
  return samples.filter((s) => s.name === name).reduce((sum, s) => sum + s.value, 0);
}

/** Return a histogram's cumulative bucket counts, summed by bound: [[le, count], ...]. */
function buckets(samples, name) {
  const byBound = new Map();
  for (const s of samples.filter((s) => s.name === `${name}_bucket`)) {
    const le = number(s.labels.le);
    byBound.set(le, (byBound.get(le) || 0) + s.value);
  }
  return [...byBound].sort((a, b) => a[0] - b[0]);
}

/** Read /metrics once and show it; tell whether to read it again. */
async function poll() {
  const status = $("#metrics-status");
  let response;
  try {
    response = await call("metrics");
  } catch (error) {
    status.textContent = `Could not read /metrics: ${error.message}`;
    return true;
  }
  if (response.status === 404) {
    status.textContent =
      "This service serves its metrics on a separate port (METRICS_PORT), which this page does not read.";
    return false;
  }
  if (!response.ok) {
    status.textContent = `Could not read /metrics: ${await errorMessage(response)}`;
    return true;
  }
  const samples = parseMetrics(await response.text());
  const now = {
    at: performance.now(),
    requests: total(samples, `${REQUESTS}_count`),
    buckets: buckets(samples, REQUESTS),
    batchSum: total(samples, "cnn_batch_size_sum"),
    batches: total(samples, "cnn_batch_size_count"),
    queue: total(samples, "cnn_batch_queue_depth"),
  };
  status.textContent = `Inference requests over all models, every ${EVERY_MS / 1000} s.`;
  show("total", String(now.requests));
  show("queue", String(now.queue));
  record("queue", now.queue);
  if (previous) showChange(previous, now);
  previous = now;
  return true;
}

/** Show what changed between two readings: the rate, the latency, the batch size. */
function showChange(before, now) {
  const seconds = (now.at - before.at) / 1000;
  // Counters only grow; a drop is a restart, whose first reading counts as no change.
  const rate = Math.max(0, now.requests - before.requests) / seconds;
  const recent = now.buckets.map(([le, count], i) => [le, Math.max(0, count - (before.buckets[i]?.[1] || 0))]);
  const batches = now.batches - before.batches;
  const batch = batches > 0 ? (now.batchSum - before.batchSum) / batches : null;
  const [p50, p99] = [quantile(0.5, recent), quantile(0.99, recent)];
  show("rate", rate.toFixed(1));
  show("p50", p50 === null ? "–" : ms(p50 * 1000));
  show("p99", p99 === null ? "–" : ms(p99 * 1000));
  show("batch", batch === null ? "–" : batch.toFixed(1));
  record("rate", rate);
  record("latency", p99 === null ? null : p99 * 1000);
  record("batch", batch);
}

function show(metric, text) {
  $(`#metric-${metric}`).textContent = text;
}

function record(chart, value) {
  const points = history[chart];
  points.push(value);
  if (points.length > POINTS) points.shift();
  draw($(`#chart-${chart}`), points);
}

/** Draw the points as bars scaled to the largest, newest on the right; none where null. */
function draw(svg, points) {
  const top = Math.max(1e-9, ...points.filter((p) => p !== null));
  const step = 120 / POINTS;
  const offset = POINTS - points.length;
  const ns = "http://www.w3.org/2000/svg";
  const element = (name, attributes) => {
    const node = document.createElementNS(ns, name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
    return node;
  };
  const bars = points.flatMap((p, i) => {
    if (p === null || p <= 0) return [];
    const height = Math.max(1, (p / top) * 36);
    const x = ((offset + i) * step + 0.3).toFixed(2);
    return [element("rect", { x, y: (39 - height).toFixed(2), width: (step - 0.6).toFixed(2), height: height.toFixed(2) })];
  });
  svg.replaceChildren(element("line", { x1: 0, y1: 39.5, x2: 120, y2: 39.5, class: "baseline" }), ...bars);
}
