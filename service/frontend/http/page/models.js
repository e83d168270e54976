// The models served, from /readyz (versions, states, input sizes, devices) and V2 model
// metadata (class labels); the model, version, top-k and explanation a request asks for.

import { $, call } from "./api.js";

const REFRESH_EVERY_MS = 15000;
let served = []; // /readyz's rows: {name, version, state, input_shape, classes, device}, + labels

/** Show what is served now, and again every few seconds (versions come and go). */
export function watchModels() {
  $("#model").addEventListener("change", fillVersions);
  loadModels();
  setInterval(loadModels, REFRESH_EVERY_MS);
}

/** Return the /predict URL of the chosen model, version and top-k, and explain if switched on. */
export function predictUrl() {
  const query = new URLSearchParams();
  if ($("#model").value) query.set("model", $("#model").value);
  if ($("#version").value) query.set("version", $("#version").value);
  const topK = Number.parseInt($("#top-k").value, 10);
  if (topK >= 1) query.set("top_k", String(topK));
  if ($("#explain").checked) query.set("explain", "gradcam");
  return `predict?${query}`;
}

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
  const count = `${available.length} model version${available.length === 1 ? "" : "s"} served.`;
  const detail = readiness.error ? `: ${readiness.error}` : "";
  $("#model-status").textContent =
    readiness.status === "ready"
      ? count
      : `The service is ${readiness.status.replace("_", " ")}${detail}; this list refreshes by itself.`;
  fillSelect($("#model"), [...new Set(available.map((row) => row.name))].map((n) => [n, n]));
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

/** Give a select these [value, text] options, keeping the choice; untouched if unchanged. */
function fillSelect(select, options) {
  const now = [...select.options].map((option) => [option.value, option.text]);
  if (JSON.stringify(now) === JSON.stringify(options)) return;
  const chosen = select.value;
  select.replaceChildren(...options.map(([value, text]) => new Option(text, value)));
  if (options.some(([value]) => value === chosen)) select.value = chosen;
}

function fillVersions() {
  const versions = served
    .filter((row) => row.name === $("#model").value && row.state === "AVAILABLE")
    .map((row) => row.version); // oldest first, as /readyz lists them
  const newest = versions.length ? ` (${versions[versions.length - 1]})` : "";
  fillSelect($("#version"), [["", `newest${newest}`], ...versions.map((v) => [v, v])]);
}

function fillTable(rows) {
  $("#models tbody").replaceChildren(
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
