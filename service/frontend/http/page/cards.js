// One card per image: its preview, then the model's answer (top-k bars, every class on
// demand, timings, the Grad-CAM heatmap over the preview when asked) or the service's message
// about it.

import { $ } from "./api.js";

export const percent = (p) => `${(p * 100).toFixed(1)}%`;
export const ms = (value) => `${value < 10 ? value.toFixed(1) : Math.round(value)} ms`;
const size = (bytes) =>
  bytes < 1024 ? `${bytes} B` : bytes < 1048576 ? `${(bytes / 1024).toFixed(0)} KB` : `${(bytes / 1048576).toFixed(1)} MB`;

/** Return a new card for a file, waiting for its answer. */
export function newCard(file) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  const img = $("img", card);
  img.src = URL.createObjectURL(file);
  img.alt = `Preview of ${file.name}`;
  img.addEventListener("load", () => {
    // The picture takes the image's shape, so that a heatmap laid over it covers the image
    // as the model saw it (stretched to its input), not the letterbox around it.
    $(".picture", card).style.setProperty("--ratio", String(img.naturalWidth / img.naturalHeight));
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

/**
 * Show one prediction of a /predict answer. `timing` is the request's: {roundTrip} in ms as
 * the browser measured it, {server} from Server-Timing, {count} images it carried.
 */
export function showPrediction(card, answer, prediction, timing) {
  settle(card, "done");
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
  const took = "total" in server ? `; the server took ${ms(server.total)} (${parts.join(", ")})` : "";
  $(".timing", card).textContent =
    `${answer.model.name} v${answer.model.version}. Round trip ${ms(timing.roundTrip)}${shared}${took}.`;
  if (prediction.explanation) showExplanation(card, prediction.explanation);
}

/**
 * Lay an explanation's heatmap (a grayscale PNG at the model's input size, white where the
 * evidence for its class is strongest) over the card's preview, scaled smoothly to it and
 * coloured by the page's #heat filter, and say what it shows.
 */
function showExplanation(card, explanation) {
  const method = explanation.method === "gradcam" ? "Grad-CAM" : explanation.method;
  const about = `${method} for ${explanation.class}, layer ${explanation.layer}`;
  const heatmap = Object.assign(document.createElement("img"), {
    className: "heatmap",
    src: `data:image/png;base64,${explanation.heatmap}`,
    alt: `${about}: warmest where the evidence for ${explanation.class} is strongest`,
    title: about,
  });
  $(".picture", card).append(heatmap);
  const caption = $(".explanation", card);
  caption.textContent = about;
  caption.hidden = false;
}

/** Say what the card's image waits for: the model, or the token the service asks for. */
export function showPending(card, text) {
  const pending = $(".pending", card);
  if (pending) pending.textContent = text;
}

/** Show the service's message (or why it could not be reached) in the card. */
export function showError(card, message) {
  settle(card, "failed");
  $(".error", card).textContent = message;
}

/** Forget every card and its preview. */
export function clearCards(list) {
  for (const img of list.querySelectorAll("img:not(.heatmap)")) URL.revokeObjectURL(img.src);
  list.replaceChildren();
}

function settle(card, outcome) {
  card.removeAttribute("aria-busy");
  card.classList.add(outcome);
  $(".pending", card)?.remove();
}

function bar(label, probability) {
  const li = Object.assign(document.createElement("li"), { className: "bar" });
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

function cell(text) {
  return Object.assign(document.createElement("td"), { textContent: text });
}
