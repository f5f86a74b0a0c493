// The assistant page: connection state, the conversation as text, the microphone and text box,
// and a card for every product the model shows. All Realtime work is in realtime-service.js.

import { RealtimeService } from "./realtime-service.js";

const money = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD" });
const LINKS = [
  ["Link3D", "3D view"],
  ["LinkAR", "AR view"],
  ["LinkVideo", "Video"],
  ["TechnicalSheet", "Technical sheet"],
];

// The store this page answers for: /?store=<id> (the ids of STORES_PATH); none: the default store.
const service = RealtimeService.getInstance({ store: new URLSearchParams(location.search).get("store") });
const $ = (id) => document.getElementById(id);
const bubbles = new Map();
let reconnecting = false;
let countdown = null;

// --- connection state ---------------------------------------------------------------------

function showStatus(state, text) {
  $("status").dataset.state = state;
  $("status-text").textContent = text;
  document.body.dataset.connection = state;
}

function showNotice(text) {
  clearInterval(countdown);
  $("notice").hidden = !text;
  $("notice").textContent = text || "";
}

/** "Too many requests right now. Retrying in 3 s." counting down to the next attempt. */
function showRetry(message, retryInMs) {
  showNotice(message);
  const retryAt = Date.now() + retryInMs;
  const render = () => {
    const seconds = Math.max(0, Math.ceil((retryAt - Date.now()) / 1000));
    $("notice").textContent = seconds > 0 ? `${message} Retrying in ${seconds} s.` : `${message} Retrying now…`;
    if (seconds === 0) clearInterval(countdown);
  };
  render();
  countdown = setInterval(render, 250);
}

const callbacks = {
  onConnected() {
    reconnecting = false;
    showStatus("connected", "Connected");
    showNotice("");
  },
  onDisconnected({ reconnecting: willReconnect }) {
    reconnecting = willReconnect;
    showStatus(willReconnect ? "reconnecting" : "idle", willReconnect ? "Reconnecting…" : "Disconnected");
  },
  onError(error) {
    if (error.retryInMs == null) {
      showNotice(error.message);
      return;
    }
    showStatus(reconnecting ? "reconnecting" : "error", reconnecting ? "Reconnecting…" : "Error");
    showRetry(error.message, error.retryInMs);
  },
  onMessage({ id, role, text, done }) {
    upsertMessage(id, role, text, done);
  },
  onMetadata(collection) {
    renderProducts(collection);
  },
  onPlayback({ playing }) {
    document.body.classList.toggle("speaking", playing);
  },
};

// --- the conversation ---------------------------------------------------------------------

function upsertMessage(id, role, text, done) {
  let bubble = bubbles.get(id);
  if (!bubble) {
    bubble = document.createElement("li");
    bubble.className = `message ${role}`;
    bubbles.set(id, bubble);
    $("messages").append(bubble);
  }
  bubble.textContent = text || (role === "user" ? "…" : "");
  bubble.classList.toggle("pending", !done);
  bubble.scrollIntoView({ block: "end" });
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("question");
  const question = input.value.trim();
  if (!question) return;
  try {
    service.sendMessage(question);
    input.value = "";
  } catch (error) {
    showNotice(error.message);
  }
});

// --- the microphone: off -> live (open mic, the server's VAD) <-> muted ---------------------

const MIC_LABELS = { off: "Talk", live: "Mute", muted: "Unmute", starting: "Starting…" };

function showMic(state) {
  const button = $("mic");
  button.dataset.state = state;
  button.setAttribute("aria-pressed", String(state === "live"));
  $("mic-label").textContent = MIC_LABELS[state];
  button.title = MIC_LABELS[state];
}

$("mic").addEventListener("click", async () => {
  const state = service.getMicrophoneState();
  if (state === "live" || state === "muted") {
    service.setMuted(state === "live");
    showMic(service.getMicrophoneState());
    return;
  }
  showMic("starting");
  try {
    await service.startMicrophone();
  } catch (error) {
    showNotice(`The microphone could not start: ${error.message}. You can still type.`);
  }
  showMic(service.getMicrophoneState());
});

// --- product cards ------------------------------------------------------------------------

function priceAfterDiscount(product) {
  const cents = Math.round(product.price * 100);
  return Math.round((cents * (100 - (product.discount || 0))) / 100) / 100;
}

function renderProducts(collection) {
  const products = collection?.JsonData?.products || [];
  $("products-text").textContent = collection?.TextMessage || "";
  $("cards").replaceChildren(...products.map(productCard));
  document.body.classList.toggle("has-products", products.length > 0);
  $("cards").scrollTo?.({ left: 0, top: 0 });
}

function productCard(product) {
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  const field = (selector) => card.querySelector(selector);
  card.dataset.sku = product.sku;
  card.style.setProperty("--hue", String(hue(product.sku)));
  field(".brand").textContent = product.brand;
  field(".name").textContent = product.name;

  const pictures = [...new Set([product.profilePic, ...(product.images || [])].filter(Boolean))];
  const main = field(".main-image");
  main.alt = product.name;
  showPicture(main, pictures[0], product);
  if (pictures.length > 1) {
    pictures.forEach((url, index) => {
      const thumb = document.createElement("button");
      thumb.type = "button";
      thumb.className = "thumb";
      thumb.dataset.index = String(index + 1);
      thumb.setAttribute("aria-label", `Picture ${index + 1} of ${product.name}`);
      const image = document.createElement("img");
      image.alt = "";
      image.loading = "lazy";
      image.addEventListener("error", () => thumb.classList.add("broken"), { once: true });
      image.src = url;
      thumb.append(image);
      thumb.addEventListener("click", () => {
        showPicture(main, url, product);
        card.querySelectorAll(".thumb").forEach((other) => other.classList.toggle("current", other === thumb));
      });
      thumb.classList.toggle("current", index === 0);
      field(".thumbs").append(thumb);
    });
  }

  const rate = Number(product.rate) || 0;
  field(".stars").style.setProperty("--rate", String(rate));
  field(".rate").textContent = rate.toFixed(1);
  field(".rating").setAttribute("aria-label", `Rated ${rate.toFixed(1)} out of 5`);

  field(".price-now").textContent = money.format(priceAfterDiscount(product));
  if (product.discount > 0) {
    field(".price-was").hidden = false;
    field(".price-was").textContent = money.format(product.price);
    field(".price-off").hidden = false;
    field(".price-off").textContent = `${product.discount}% off`;
    field(".discount-badge").hidden = false;
    field(".discount-badge").textContent = `−${product.discount}%`;
  }
  field(".description").textContent = product.description || "";

  for (const { question, answer } of product.FAQS || []) {
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = question;
    const reply = document.createElement("p");
    reply.textContent = answer;
    details.append(summary, reply);
    field(".faqs").append(details);
  }

  for (const [key, label] of LINKS) {
    if (!product[key]) continue;
    const link = document.createElement("a");
    link.href = product[key];
    link.target = "_blank";
    link.rel = "noopener";
    link.className = `link link-${key.toLowerCase()}`;
    link.textContent = label;
    field(".links").append(link);
  }
  return card;
}

/** The picture, or, when it cannot load, a monogram of the brand on the product's own colour. */
function showPicture(image, url, product) {
  const frame = image.parentElement;
  frame.classList.remove("placeholder");
  frame.dataset.monogram = monogram(product.brand);
  frame.dataset.kind = product.name.split(" ").slice(-1)[0];
  image.addEventListener("error", () => frame.classList.add("placeholder"), { once: true });
  if (url) image.src = url;
  else frame.classList.add("placeholder");
}

function monogram(brand) {
  const words = String(brand || "?").split(/[\s&]+/).filter(Boolean);
  return words.slice(0, 2).map((word) => word[0].toUpperCase()).join("");
}

function hue(text) {
  let hash = 0;
  for (const char of text) hash = (hash * 31 + char.codePointAt(0)) % 360;
  return hash;
}

// --- start ----------------------------------------------------------------------------------

// Any click or key unlocks audio (browsers only play sound after the user interacts).
for (const type of ["pointerdown", "keydown"]) {
  document.addEventListener(type, () => service.unlockAudio?.(), { once: true, capture: true });
}
showStatus("connecting", "Connecting…");
showMic("off");
service.connect(callbacks);
