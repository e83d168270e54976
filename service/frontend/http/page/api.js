// Talking to the service: its public endpoints, its error messages, its bearer token.

const TOKEN_KEY = "cnn-serving.token";

export const $ = (selector, root = document) => root.querySelector(selector);

/** Fetch a path of this service (relative: the page may sit under a proxy's prefix). */
export function call(path, options = {}) {
  const token = currentToken();
  const headers = new Headers(options.headers || {});
  if (token) headers.set("Authorization", `Bearer ${token}`);
  return fetch(path, { ...options, headers });
}

/** Return the service's error message of a failed response, in its own words. */
export async function errorMessage(response) {
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
export function serverTiming(header) {
  const timing = {};
  for (const metric of (header || "").split(",")) {
    const [name, ...params] = metric.trim().split(";");
    const duration = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    if (name && duration) timing[name] = Number(duration.slice(4));
  }
  return timing;
}

/** Forget the token: the service refused it, or the user asked. */
export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  showTokenButton();
}

/** Return the token this tab keeps, or null. */
export function currentToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

let answer = null; // while the dialog is open: the answer every 401 meanwhile waits for

/**
 * Ask for the token, saying why; resolve true once one is given, false if declined. A 401
 * that comes while the dialog is open waits for the same answer: the dialog stays as it is,
 * with what the user has typed.
 */
export function askForToken(message) {
  if (answer) return answer;
  const dialog = $("#token-dialog");
  $("#token-error").textContent = message;
  $("#token").value = "";
  dialog.returnValue = ""; // Escape leaves it as it was: the last dialog's "ok" must not count
  dialog.showModal();
  answer = new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const token = $("#token").value.trim();
        const given = dialog.returnValue === "ok" && token !== "";
        if (given) sessionStorage.setItem(TOKEN_KEY, token);
        showTokenButton();
        answer = null;
        resolve(given);
      },
      { once: true },
    );
  });
  return answer;
}

export function showTokenButton() {
  $("#forget-token").hidden = !currentToken();
}
