// The page at /: pick a model, send images to /predict, show each answer in a card, and
// chart the service's own /metrics. It speaks only the public API, as any client does.
"use strict";

const TOKEN_KEY = "cnn-serving.token";
// Images and bytes per request: well under the service's defaults (64 images, 16 MiB), so a
// batch of photos goes as one request; a request refused as too large is resent image by image.
const REQUEST_IMAGES = 32;
const REQUEST_BYTES = 8 * 1024 * 1024;
const METRICS_EVERY_MS = 3000;
const MODELS_EVERY_MS = 15000;
const CHART_POINTS = 40;
const IMAGE_FILE = /\.(jpe?g|png|gif|bmp|webp|tiff?)$/i;

const $ = (selector, root = document) => root.querySelector(selector);

// -- Talking to the service --------------------------------------------------------------

/** Fetch a path of this service, with the bearer token if one is kept. */
function call(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = new Headers(options.headers || {});
  if (token) headers.set("Authorization", `Bearer ${token}`);
  return fetch(path, { ...options, headers });
}

/** Return the service's error message of a failed response, in its own words. */
async function errorMessage(response) {
  let message = "";
  try {
    const body = await response.json();
    message = typeof body.error === "string" ? body.error : body.error.message;
  } catch {
    message = response.statusText;
  }
  const retry = response.headers.get("Retry-After");
  return `${message || "error"} (HTTP ${response.status}${retry ? `; try again in ${retry} s` : ""})`;
}

/** Return {name: milliseconds} of a Server-Timing header such as "model;dur=6.2, total;dur=7". */
function serverTiming(header) {
  const timing = {};
  for (const metric of (header || "").split(",")) {
    const [name, ...params] = metric.trim().split(";");
    const duration = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    if (name && duration) timing[name] = Number(duration.slice(4));
  }
  return timing;
}

// -- The token -----------------------------------------------------------------------------

const tokenDialog = $("#token-dialog");

/** Ask for the token, saying why; resolve true once one is given, false if declined. */
function askForToken(message) {
  $("#token-error").textContent = message;
  $("#token").value = "";
  tokenDialog.showModal();
  return new Promise((resolve) => {
    tokenDialog.addEventListener(
      "close",
      () => {
        const token = $("#token").value.trim();
        const given = tokenDialog.returnValue === "ok" && token !== "";
        if (given) sessionStorage.setItem(TOKEN_KEY, token);
        showTokenButton();
        resolve(given);
      },
      { once: true },
    );
  });
}

function showTokenButton() {
  $("#forget-token").hidden = !sessionStorage.getItem(TOKEN_KEY);
}

$("#forget-token").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showTokenButton();
});

// -- Models ----------------------------------------------------------------------------------

const modelSelect = $("#model");
const versionSelect = $("#version");
let served = []; // [{name, version, state, input_shape, classes, device, labels}]

/** Ask /readyz what is served, and V2 metadata for each version's labels; fill the lists. */
async function loadModels() {
  let readiness;
  try {
    readiness = await (await call("readyz")).json();
  } catch (error) {
    $("#model-status").textContent = `Could not reach the service: ${error.message}`;
    return;
  }
  const rows = readiness.models || [];
  const known = new Map(served.map((row) => [`${row.name}/${row.version}`, row.labels]));
  for (const row of rows) {
    row.labels = known.get(`${row.name}/${row.version}`);
    if (row.labels === undefined && row.state === "AVAILABLE") row.labels = await labelsOf(row);
  }
  served = rows;
  const available = rows.filter((row) => row.state === "AVAILABLE");
  $("#model-status").textContent =
    readiness.status === "ready"
      ? `${available.length} model version${available.length === 1 ? "" : "s"} served.`
      : `The service is ${readiness.status.replace("_", " ")}${readiness.error ? `: ${readiness.error}` : ""}; this list refreshes by itself.`;
  fillSelect(modelSelect, [...new Set(available.map((row) => row.name))].map((n) => [n, n]));
  fillVersions();
  fillTable(rows);
}

async function labelsOf(row) {
  const path = `v2/models/${encodeURIComponent(row.name)}/versions/${encodeURIComponent(row.version)}`;
  try {
    const response = await call(path);
    return response.ok ? (await response.json()).parameters?.labels : undefined;
  } catch {
    return undefined;
  }
}

function fillSelect(select, options) {
  const chosen = select.value;
  select.replaceChildren(...options.map(([value, text]) => new Option(text, value)));
  if (options.some(([value]) => value === chosen)) select.value = chosen;
}

function fillVersions() {
  const versions = served
    .filter((row) => row.name === modelSelect.value && row.state === "AVAILABLE")
    .map((row) => row.version);
  const newest = versions.length ? ` (${versions[versions.length - 1]})` : "";
  fillSelect(versionSelect, [["", `newest${newest}`], ...versions.map((v) => [v, v])]);
}

function fillTable(rows) {
  const body = $("#models tbody");
  body.replaceChildren(
    ...rows.map((row) => {
      const tr = document.createElement("tr");
      const classes = row.labels ? row.labels.join(", ") : (row.classes ?? "–");
      const input = row.input_shape ? row.input_shape.join(" × ") : "–";
      for (const text of [row.name, row.version, input, classes, row.device || "–", row.state]) {
        tr.append(Object.assign(document.createElement("td"), { textContent: text }));
      }
      return tr;
    }),
  );
  $("#models").hidden = rows.length === 0;
}

modelSelect.addEventListener("change", fillVersions);

/** Return the /predict URL of the chosen model, version and top-k. */
function predictUrl() {
  const query = new URLSearchParams();
  if (modelSelect.value) query.set("model", modelSelect.value);
  if (versionSelect.value) query.set("version", versionSelect.value);
  const topK = Number.parseInt($("#top-k").value, 10);
  if (topK >= 1) query.set("top_k", String(topK));
  return `predict?${query}`;
}

// -- Images in -------------------------------------------------------------------------------

const dropZone = $("#drop-zone");

$("#files").addEventListener("change", (event) => {
  classify([...event.target.files]);
  event.target.value = "";
});
$("#folder").addEventListener("change", (event) => {
  classify([...event.target.files].filter(isImageFile));
  event.target.value = "";
});
document.addEventListener("paste", (event) => {
  const files = [...(event.clipboardData?.files || [])];
  if (!files.length) return;
  event.preventDefault();
  const stamp = new Date().toLocaleTimeString();
  classify(files.map((file, i) => new File([file], `pasted ${stamp} #${i + 1}`, { type: file.type })));
});
// Anywhere on the page: a drop that misses the zone must not navigate away to the image.
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropZone.classList.add("dragging");
});
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) dropZone.classList.remove("dragging");
});
document.addEventListener("drop", async (event) => {
  event.preventDefault();
  dropZone.classList.remove("dragging");
  const entries = [...event.dataTransfer.items].map((item) => item.webkitGetAsEntry?.());
  if (entries.length && entries.every(Boolean)) {
    classify((await Promise.all(entries.map(filesOf))).flat());
  } else {
    classify([...event.dataTransfer.files]);
  }
});

function isImageFile(file) {
  return !file.name.startsWith(".") && (file.type.startsWith("image/") || IMAGE_FILE.test(file.name));
}

/** Return the files of a dropped entry: the file itself, or a folder's images, recursively. */
async function filesOf(entry) {
  if (entry.isFile) return [await new Promise((resolve, reject) => entry.file(resolve, reject))];
  const reader = entry.createReader();
  const files = [];
  for (;;) {
    // readEntries answers in pieces (100 at a time in Chromium) until it answers none.
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) return files.filter(isImageFile);
    for (const child of batch) files.push(...(await filesOf(child)));
  }
}

// -- Classifying -----------------------------------------------------------------------------

const cards = $("#cards");
let queue = Promise.resolve(); // requests go one after another, in the order images came

/** Give each file a card, and send them to /predict in as few requests as the limits allow. */
function classify(files) {
  if (!files.length) return;
  const items = files.map((file) => ({ file, card: newCard(file) }));
  cards.prepend(...items.map((item) => item.card));
  setSummary(`Sending ${files.length} image${files.length === 1 ? "" : "s"}…`);
  for (const chunk of chunks(items)) queue = queue.then(() => send(chunk, true));
  queue = queue.then(() => setSummary(summaryText()));
}

function* chunks(items) {
  let chunk = [];
  let bytes = 0;
  for (const item of items) {
    if (chunk.length && (chunk.length === REQUEST_IMAGES || bytes + item.file.size > REQUEST_BYTES)) {
      yield chunk;
      chunk = [];
      bytes = 0;
    }
    chunk.push(item);
    bytes += item.file.size;
  }
  if (chunk.length) yield chunk;
}

/**
 * POST the images as one multipart request and fill their cards. When the service refuses
 * the request (a 4xx: one image that does not decode fails them all), resend each image
 * alone, so that each card gets its own answer or the service's message about that image.
 */
async function send(items, mayResendAlone) {
  const form = new FormData();
  const names = new Set();
  for (const { file } of items) {
    // Part names are the file names, made unique: the service's messages name the part,
    // and parts sharing a name would be grouped out of order.
    let name = file.name || "image";
    for (let n = 2; names.has(name); n += 1) name = `${file.name} (${n})`;
    names.add(name);
    form.append(name, file, file.name);
  }
  const started = performance.now();
  let response;
  try {
    response = await call(predictUrl(), { method: "POST", body: form });
  } catch (error) {
    return showError(items, `Could not reach the service: ${error.message}`);
  }
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY); // wrong, or none: ask again rather than resend it
    showTokenButton();
    const message = await errorMessage(response);
    if (await askForToken(message)) return send(items, mayResendAlone);
    return showError(items, message);
  }
  if (!response.ok) {
    if (mayResendAlone && items.length > 1 && response.status < 500) {
      for (const item of items) await send([item], false);
      return undefined;
    }
    return showError(items, await errorMessage(response));
  }
  const answer = await response.json();
  const roundTrip = performance.now() - started;
  const timing = { roundTrip, server: serverTiming(response.headers.get("Server-Timing")), count: items.length };
  items.forEach((item, i) => showPrediction(item.card, answer, answer.predictions[i], timing));
  return undefined;
}

// -- Cards -----------------------------------------------------------------------------------

function newCard(file) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  const img = $("img", card);
  img.src = URL.createObjectURL(file);
  img.alt = `Preview of ${file.name}`;
  img.addEventListener("load", () => {
    $(".meta", card).textContent = `${img.naturalWidth} × ${img.naturalHeight} px, ${size(file.size)}`;
  });
  img.addEventListener("error", () => {
    // TIFF, or not an image at all: the browser cannot draw it; the service may still read it.
    img.replaceWith(Object.assign(document.createElement("span"), { textContent: "no preview" }));
  });
  $(".name", card).textContent = file.name;
  $(".meta", card).textContent = size(file.size);
  card.setAttribute("aria-busy", "true");
  return card;
}

function showPrediction(card, answer, prediction, timing) {
  card.removeAttribute("aria-busy");
  card.classList.add("done");
  $(".pending", card).remove();
  $(".bars", card).replaceChildren(...prediction.top.map((t) => bar(t.label, t.probability)));
  const distribution = $(".distribution", card);
  $("tbody", distribution).replaceChildren(
    ...answer.classes.map((label, i) => {
      const tr = document.createElement("tr");
      tr.append(cell(label), cell(percent(prediction.probabilities[i])));
      return tr;
    }),
  );
  $("summary", distribution).textContent = `Every class (${answer.classes.length})`;
  distribution.hidden = false;
  const { server } = timing;
  const parts = ["read", "model"].filter((n) => n in server).map((n) => `${n} ${ms(server[n])}`);
  const shared = timing.count > 1 ? ` for ${timing.count} images in one request` : "";
  $(".timing", card).textContent =
    `${answer.model.name} v${answer.model.version}. Round trip ${ms(timing.roundTrip)}${shared}` +
    ("total" in server ? `; the server took ${ms(server.total)} (${parts.join(", ")})` : "") + ".";
}

function bar(label, probability) {
  const li = document.createElement("li");
  li.className = "bar";
  li.dataset.probability = String(probability);
  const track = Object.assign(document.createElement("span"), { className: "track" });
  const fill = Object.assign(document.createElement("span"), { className: "fill" });
  fill.style.width = `${Math.max(0, Math.min(100, probability * 100))}%`;
  track.setAttribute("aria-hidden", "true");
  track.append(fill);
  li.append(
    Object.assign(document.createElement("span"), { className: "label", textContent: label }),
    track,
    Object.assign(document.createElement("span"), { className: "value", textContent: percent(probability) }),
  );
  return li;
}

function showError(items, message) {
  for (const { card } of items) {
    card.removeAttribute("aria-busy");
    card.classList.add("failed");
    $(".pending", card)?.remove();
    $(".error", card).textContent = message;
  }
}

function cell(text) {
  return Object.assign(document.createElement("td"), { textContent: text });
}

function setSummary(text) {
  $("#summary").textContent = text;
}

function summaryText() {
  const done = cards.querySelectorAll(".card.done").length;
  const failed = cards.querySelectorAll(".card.failed").length;
  return `${done} image${done === 1 ? "" : "s"} classified${failed ? `, ${failed} refused` : ""}.`;
}

$("#clear").addEventListener("click", () => {
  for (const img of cards.querySelectorAll("img")) URL.revokeObjectURL(img.src);
  cards.replaceChildren();
  setSummary("No images yet.");
});

const percent = (p) => `${(p * 100).toFixed(1)}%`;
const ms = (value) => `${value < 10 ? value.toFixed(1) : Math.round(value)} ms`;
const size = (bytes) =>
  bytes < 1024 ? `${bytes} B` : bytes < 1048576 ? `${(bytes / 1024).toFixed(0)} KB` : `${(bytes / 1048576).toFixed(1)} MB`;

// -- The live panel --------------------------------------------------------------------------

/** Parse the Prometheus text format: [{name, labels, value}], comments skipped. */
function parseMetrics(text) {
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
    samples.push({ name: match[1], labels, value: Number(match[3].replace("Inf", "Infinity")) });
  }
  return samples;
}

/** Sum the samples named `name`, over every label set (every model and version). */
function total(samples, name) {
  return samples.filter((s) => s.name === name).reduce((sum, s) => sum + s.value, 0);
}

/** Return the cumulative bucket counts of a histogram, summed by bound: [[le, count], ...]. */
function buckets(samples, name) {
  const byBound = new Map();
  for (const s of samples.filter((s) => s.name === `${name}_bucket`)) {
    const le = Number(s.labels.le.replace("Inf", "Infinity"));
    byBound.set(le, (byBound.get(le) || 0) + s.value);
  }
  return [...byBound].sort((a, b) => a[0] - b[0]);
}

/** Estimate a quantile from bucket counts, as Prometheus's histogram_quantile does. */
function quantile(q, counts) {
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

const REQUESTS = "cnn_model_request_duration_seconds";
const history = { rate: [], latency: [], batch: [], queue: [] };
let previous = null;

async function pollMetrics() {
  let response;
  try {
    response = await call("metrics");
  } catch (error) {
    $("#metrics-status").textContent = `Could not read /metrics: ${error.message}`;
    return true;
  }
  if (response.status === 404) {
    $("#metrics-status").textContent =
      "This service serves its metrics on a separate port (METRICS_PORT), which this page does not read.";
    return false;
  }
  if (!response.ok) {
    $("#metrics-status").textContent = `Could not read /metrics: ${await errorMessage(response)}`;
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
  $("#metrics-status").textContent = `Inference requests over all models, every ${METRICS_EVERY_MS / 1000} s.`;
  $("#metric-total").textContent = String(now.requests);
  $("#metric-queue").textContent = String(now.queue);
  record("queue", now.queue);
  if (previous) {
    const seconds = (now.at - previous.at) / 1000;
    const requests = now.requests - previous.requests;
    const recent = now.buckets.map(([le, count], i) => [le, count - (previous.buckets[i]?.[1] || 0)]);
    const batches = now.batches - previous.batches;
    const p50 = quantile(0.5, recent);
    const p99 = quantile(0.99, recent);
    const batch = batches > 0 ? (now.batchSum - previous.batchSum) / batches : null;
    $("#metric-rate").textContent = (requests / seconds).toFixed(1);
    $("#metric-p50").textContent = p50 === null ? "–" : ms(p50 * 1000);
    $("#metric-p99").textContent = p99 === null ? "–" : ms(p99 * 1000);
    $("#metric-batch").textContent = batch === null ? "–" : batch.toFixed(1);
    record("rate", requests / seconds);
    record("latency", p99 === null ? null : p99 * 1000);
    record("batch", batch);
  }
  previous = now;
  return true;
}

function record(chart, value) {
  const points = history[chart];
  points.push(value);
  if (points.length > CHART_POINTS) points.shift();
  draw($(`#chart-${chart}`), points);
}

/** Draw the points as bars scaled to the largest, newest on the right; none where null. */
function draw(svg, points) {
  const top = Math.max(1e-9, ...points.filter((p) => p !== null));
  const step = 120 / CHART_POINTS;
  const offset = CHART_POINTS - points.length;
  const ns = "http://www.w3.org/2000/svg";
  const baseline = document.createElementNS(ns, "line");
  Object.entries({ x1: 0, y1: 39.5, x2: 120, y2: 39.5, class: "baseline" }).forEach(([k, v]) =>
    baseline.setAttribute(k, v),
  );
  const bars = points.flatMap((p, i) => {
    if (p === null || p <= 0) return [];
    const rect = document.createElementNS(ns, "rect");
    const height = Math.max(1, (p / top) * 36);
    const box = { x: (offset + i) * step + 0.3, y: 39 - height, width: step - 0.6, height };
    Object.entries(box).forEach(([k, v]) => rect.setAttribute(k, v.toFixed(2)));
    return [rect];
  });
  svg.replaceChildren(baseline, ...bars);
}

// -- Start -----------------------------------------------------------------------------------

showTokenButton();
loadModels();
setInterval(loadModels, MODELS_EVERY_MS);
(async function metricsLoop() {
  if (await pollMetrics()) setTimeout(metricsLoop, METRICS_EVERY_MS);
})();
