// The page at /: images in (file dialog, folder, drop, paste), to /predict in as few requests
// as the limits allow, each answer into its card. It speaks only the public API.

import {
  $,
  askForToken,
  call,
  currentToken,
  errorMessage,
  forgetToken,
  serverTiming,
  showTokenButton,
} from "./api.js";
import { clearCards, newCard, showError, showPending, showPrediction } from "./cards.js";
import { watchMetrics } from "./metrics.js";
import { predictUrl, watchModels } from "./models.js";

// Images and bytes per request: under the service's defaults (64 images, 16 MiB), so a batch
// of photos goes as one request; a request refused as too large is resent image by image.
const REQUEST_IMAGES = 32;
const REQUEST_BYTES = 8 * 1024 * 1024;
const IMAGE_FILE = /\.(jpe?g|png|gif|bmp|webp|tiff?)$/i;

const cards = $("#cards");
const dropZone = $("#drop-zone");
let queue = Promise.resolve(); // requests go one after another, in the order images came

/** Give each file a card, and send them to /predict in as few requests as the limits allow. */
function classify(files) {
  if (!files.length) return;
  const items = files.map((file) => ({ file, card: newCard(file) }));
  cards.prepend(...items.map((item) => item.card));
  setSummary(`Sending ${files.length} image${files.length === 1 ? "" : "s"}…`);
  for (const chunk of chunks(items)) enqueue(chunk, true);
  queue = queue.then(() => setSummary(summaryText()));
}

function enqueue(items, mayResendAlone) {
  queue = queue.then(() => send(items, mayResendAlone));
}

function* chunks(items) {
  let chunk = [];
  let bytes = 0;
  for (const item of items) {
    if (chunk.length && (chunk.length === REQUEST_IMAGES || bytes + item.file.size > REQUEST_BYTES)) {
      yield chunk;
      [chunk, bytes] = [[], 0];
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
 * Refused for its token (a 401), the request steps aside to wait for the one token dialog,
 * and the queue goes on: each 401 that comes meanwhile waits for the same dialog, and once
 * the user gives a token, every request that waited goes again, in its turn.
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
  const fail = (message) => items.forEach(({ card }) => showError(card, message));
  const started = performance.now();
  const sent = currentToken();
  let response;
  try {
    response = await call(predictUrl(), { method: "POST", body: form });
  } catch (error) {
    return fail(`Could not reach the service: ${error.message}`);
  }
  if (response.status === 401) {
    const message = await errorMessage(response);
    let given = Promise.resolve(true); // a token given since this request left: try it
    if (currentToken() === sent) {
      forgetToken(); // wrong, or none: ask again rather than send it again
      given = askForToken(sent ? `The service refused this token: ${message}` : message);
      items.forEach(({ card }) => showPending(card, "Waiting for the token…"));
    }
    given.then((ok) => {
      if (ok) {
        items.forEach(({ card }) => showPending(card, "Waiting for the model…"));
        enqueue(items, mayResendAlone);
      } else {
        fail(message);
      }
      queue = queue.then(() => setSummary(summaryText()));
    });
    return undefined;
  }
  if (!response.ok) {
    if (mayResendAlone && items.length > 1 && response.status < 500) {
      for (const item of items) await send([item], false);
      return undefined;
    }
    return fail(await errorMessage(response));
  }
  const answer = await response.json();
  const timing = {
    roundTrip: performance.now() - started,
    server: serverTiming(response.headers.get("Server-Timing")),
    count: items.length,
  };
  items.forEach((item, i) => showPrediction(item.card, answer, answer.predictions[i], timing));
  return undefined;
}

function setSummary(text) {
  $("#summary").textContent = text;
}

function summaryText() {
  const done = cards.querySelectorAll(".card.done").length;
  const failed = cards.querySelectorAll(".card.failed").length;
  const waiting = cards.querySelectorAll(".card[aria-busy]").length;
  const refused = failed ? `, ${failed} refused` : "";
  return `${done} image${done === 1 ? "" : "s"} classified${refused}${waiting ? `, ${waiting} waiting` : ""}.`;
}

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

// -- Images in: chosen (files or a folder), pasted, dropped -----------------------------------

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
  // Entries are read now: the drop's items are gone once this handler awaits.
  const entries = [...event.dataTransfer.items].map((item) => item.webkitGetAsEntry?.());
  if (entries.length && entries.every(Boolean)) {
    classify((await Promise.all(entries.map(filesOf))).flat());
  } else {
    classify([...event.dataTransfer.files]);
  }
});

$("#clear").addEventListener("click", () => {
  clearCards(cards);
  setSummary("No images yet.");
});
$("#forget-token").addEventListener("click", forgetToken);

showTokenButton();
watchModels();
watchMetrics();
