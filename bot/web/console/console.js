// The operators' console: the live feed (server-sent events from /console/feed) drawn as calls in
// progress and calls that ended, and the outbox (polled from /console/outbox) with a retry button.
// Plain DOM, no framework, nothing from another host. Text from the feed is set as textContent
// only, never as HTML.

const $ = (id) => document.getElementById(id);
const OUTBOX_POLL_MS = 5000;
const money = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD" });
const STATES = {
  connecting: "Connecting",
  listening: "Listening",
  bot_speaking: "Bot speaking",
  tool_running: "Tool running",
  transferring: "Transferring",
  ending: "Saying goodbye",
};
const OUTCOMES = {
  caller_hung_up: "Caller hung up",
  ended_by_bot: "Ended by the bot",
  caller_idle: "Caller silent",
  transferred: "Transferred",
  fallback: "Fallback",
};
// What happened in a call besides words (transcript entries of role "event").
const EVENTS = {
  idle_prompt: "The caller went quiet: the bot asked whether they are still there",
  idle_hang_up: "The caller stayed quiet: the bot said goodbye and hung up",
};
const KINDS = { "products.sent": "Product details", "call.completed": "Call record" };
const CHANNELS = { sms: "SMS", webhook: "Webhook" };

let clockOffsetS = 0; // the server's clock minus this browser's
const live = new Map(); // call_sid -> { call, element }
let recent = []; // ended calls, newest first

// --- the live feed ------------------------------------------------------------------------

function connect() {
  const source = new EventSource("/console/feed");
  source.addEventListener("open", () => showStatus("live", "Live"));
  source.addEventListener("error", () => showStatus("reconnecting", "Reconnecting…"));
  source.addEventListener("message", (message) => handle(JSON.parse(message.data)));
}

function handle(event) {
  switch (event.type) {
    case "snapshot":
      clockOffsetS = event.now - Date.now() / 1000;
      live.clear();
      $("live-calls").replaceChildren();
      for (const call of event.live) addLive(call);
      recent = event.recent;
      renderRecent();
      break;
    case "call":
      addLive(event.call);
      break;
    case "state":
      change(event.call_sid, (call) => (call.state = event.state), renderHead);
      break;
    case "line":
      change(event.call_sid, (call) => upsertLine(call.lines, event.line), renderTimeline);
      break;
    case "tool":
      change(event.call_sid, (call) => call.tools.push(event.tool), renderTimeline);
      break;
    case "products":
      change(event.call_sid, (call) => call.products.push(...event.products), renderProducts);
      break;
    case "turn":
      change(event.call_sid, (call) => call.turns.push(event.turn), renderTurns);
      break;
    case "ended":
      live.get(event.call.call_sid)?.element.remove();
      live.delete(event.call.call_sid);
      recent = [event.call, ...recent.filter((call) => call.call_sid !== event.call.call_sid)];
      renderRecent();
      refreshOutbox();
      break;
  }
  renderFigures();
}

function change(callSid, update, render) {
  const entry = live.get(callSid);
  if (!entry) return;
  update(entry.call);
  render(entry.element, entry.call);
}

function upsertLine(lines, line) {
  const known = lines.findIndex((shown) => shown.index === line.index);
  if (known >= 0) lines[known] = line;
  else lines.push(line);
}

function showStatus(state, text) {
  $("status").dataset.state = state;
  $("status-text").textContent = text;
}

// --- calls ----------------------------------------------------------------------------------

function addLive(call) {
  live.get(call.call_sid)?.element.remove();
  const element = $("call-template").content.firstElementChild.cloneNode(true);
  element.dataset.callSid = call.call_sid;
  live.set(call.call_sid, { call, element });
  renderHead(element, call);
  renderTurns(element, call);
  renderTimeline(element, call);
  renderProducts(element, call);
  $("live-calls").prepend(element);
}

function renderHead(element, call) {
  element.dataset.state = call.state;
  element.querySelector(".caller").textContent = callerLabel(call.caller, call.store);
  const state = element.querySelector(".state");
  state.textContent = STATES[call.state] || call.state;
  state.dataset.state = call.state;
  tick(element, call);
}

function tick(element, call) {
  const elapsed = Date.now() / 1000 + clockOffsetS - call.started_at;
  element.querySelector(".clock").textContent = duration(elapsed);
}

/** Each answered turn: how long the caller waited after they stopped talking, and the bot's part. */
function renderTurns(element, call) {
  const turns = element.querySelector(".turns");
  turns.hidden = call.turns.length === 0;
  if (!call.turns.length) return;
  const span = (className, textContent) => Object.assign(document.createElement("span"), { className, textContent });
  const chips = call.turns.map((turn, index) => {
    const chip = span("turn", seconds(turn.latency_ms));
    chip.title = `Turn ${index + 1}: the caller waited ${turn.latency_ms} ms, the bot's own part ${turn.bot_ms} ms`;
    return chip;
  });
  const label = (text) => span("turns-label", text);
  const botPart = Math.max(...call.turns.map((turn) => turn.bot_ms));
  turns.replaceChildren(label("Replied in"), ...chips, label(`· the bot's own part ≤ ${botPart} ms`));
}

function renderTimeline(element, call) {
  const timeline = element.querySelector(".timeline");
  const follow = timeline.scrollHeight - timeline.scrollTop - timeline.clientHeight < 24;
  const items = [
    ...call.lines.map((line) => ({ at: line.at_ms, node: lineNode(line) })),
    ...call.tools.map((tool) => ({ at: tool.at_ms ?? Infinity, node: toolNode(tool) })),
  ].sort((a, b) => a.at - b.at);
  timeline.replaceChildren(...items.map((item) => item.node));
  if (follow) timeline.scrollTop = timeline.scrollHeight;
}

function lineNode(line) {
  if (line.role === "event") return eventNode(line);
  const item = document.createElement("li");
  item.className = `line ${line.role}`;
  item.classList.toggle("interrupted", line.interrupted);
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = `${line.role === "user" ? "Caller" : "Bot"} · ${duration(line.at_ms / 1000)}`;
  const text = document.createElement("p");
  text.className = "text";
  text.textContent = line.text;
  item.append(who, text);
  if (line.interrupted) {
    const cut = document.createElement("span");
    cut.className = "cut";
    cut.textContent = "interrupted";
    item.append(cut);
  }
  return item;
}

function eventNode(line) {
  const item = document.createElement("li");
  item.className = "event";
  item.textContent = `${EVENTS[line.text] || line.text} · ${duration(line.at_ms / 1000)}`;
  return item;
}

function toolNode(tool) {
  const item = document.createElement("li");
  item.className = `tool ${tool.outcome}`;
  const name = document.createElement("code");
  name.textContent = tool.name;
  const detail = document.createElement("span");
  detail.className = "tool-detail";
  const summary = tool.summary ? `“${tool.summary}” · ` : "";
  detail.textContent = `${summary}${tool.outcome === "ok" ? "" : tool.outcome.replace("_", " ") + " · "}${tool.ms} ms`;
  item.append(name, detail);
  return item;
}

function renderProducts(element, call) {
  const products = element.querySelector(".products");
  if (products.childElementCount === call.products.length) return;
  products.replaceChildren(...call.products.map(productCard));
  element.querySelector(".sent").hidden = call.products.length === 0;
}

function productCard(product) {
  const card = $("product-template").content.firstElementChild.cloneNode(true);
  card.dataset.sku = product.sku;
  card.style.setProperty("--hue", String(hue(product.sku)));
  card.querySelector(".product-brand").textContent = product.brand;
  card.querySelector(".product-name").textContent = product.name;
  card.querySelector(".price-now").textContent = money.format(product.price_after_discount);
  if (product.discount > 0) {
    const was = card.querySelector(".price-was");
    was.hidden = false;
    was.textContent = money.format(product.price);
  }
  const frame = card.querySelector(".picture");
  frame.dataset.monogram = monogram(product.brand);
  const image = frame.querySelector("img");
  image.alt = product.name;
  image.addEventListener("error", () => frame.classList.add("placeholder"), { once: true });
  if (product.picture) image.src = product.picture;
  else frame.classList.add("placeholder");
  for (const [label, url] of Object.entries(product.links)) {
    const link = document.createElement("a");
    link.href = url;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    link.textContent = label;
    card.querySelector(".product-links").append(link);
  }
  return card;
}

// --- recent calls ---------------------------------------------------------------------------

function renderRecent() {
  const open = new Set([...document.querySelectorAll(".recent-call details[open]")].map((d) => d.dataset.callSid));
  $("recent-calls").replaceChildren(...recent.map((call) => recentItem(call, open.has(call.call_sid))));
  $("no-recent").hidden = recent.length > 0;
}

function recentItem(call, open) {
  const item = $("recent-template").content.firstElementChild.cloneNode(true);
  item.dataset.callSid = call.call_sid;
  const details = item.querySelector("details");
  details.dataset.callSid = call.call_sid;
  details.open = open;
  const started = new Date((call.started_at - clockOffsetS) * 1000);
  const time = started.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  item.querySelector(".recent-time").textContent = time;
  item.querySelector(".caller").textContent = callerLabel(call.caller, call.store);
  const outcome = item.querySelector(".outcome");
  outcome.textContent = OUTCOMES[call.outcome] || call.outcome;
  outcome.dataset.outcome = call.outcome;
  item.querySelector(".recent-duration").textContent = duration(call.duration_s ?? 0);
  item.querySelector(".recent-cost").textContent = dollars(call.cost_usd);
  renderTurns(item, call);
  renderTimeline(item, call);
  renderProducts(item, call);
  return item;
}

// --- the outbox -----------------------------------------------------------------------------

async function refreshOutbox() {
  let view;
  try {
    const response = await fetch("/console/outbox", { cache: "no-store" });
    view = await response.json();
    if (!response.ok) throw new Error(view.error || `HTTP ${response.status}`);
  } catch (error) {
    $("outbox-error").hidden = false;
    $("outbox-error").textContent = `The outbox cannot be read right now: ${error.message}`;
    return;
  }
  $("outbox-error").hidden = true;
  const pending = view.pending.sms + view.pending.webhook;
  const failed = view.failed.sms + view.failed.webhook;
  $("outbox-totals").textContent = `${pending} on the way · ${failed} failed`;
  $("outbox-rows").replaceChildren(...view.rows.map(outboxRow));
  $("outbox-empty").hidden = view.rows.length > 0;
}

function outboxRow(row) {
  const item = $("outbox-template").content.firstElementChild.cloneNode(true);
  item.dataset.messageId = row.message_id;
  item.dataset.state = row.state;
  const kind = `${KINDS[row.kind] || row.kind} · ${CHANNELS[row.channel] || row.channel}`;
  item.querySelector(".outbox-kind").textContent = kind;
  item.querySelector(".outbox-to").textContent = row.to ? `to ${callerLabel(row.to)}` : "to the call center";
  const tries = row.attempts ? ` · ${row.attempts} ${row.attempts === 1 ? "try" : "tries"}` : "";
  item.querySelector(".outbox-state").textContent = `${row.state}${tries}`;
  const reason = [row.error_code ? `[${row.error_code}]` : "", row.reason].filter(Boolean).join(" ");
  item.querySelector(".outbox-reason").textContent = reason;
  const retry = item.querySelector(".retry");
  retry.hidden = !row.retryable;
  retry.addEventListener("click", async () => {
    retry.disabled = true;
    retry.textContent = "Retrying…";
    const response = await fetch(`/console/outbox/${encodeURIComponent(row.message_id)}/retry`, { method: "POST" });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      retry.textContent = "Retry";
      retry.disabled = false;
      item.querySelector(".outbox-reason").textContent = body.error || `Retry refused (HTTP ${response.status})`;
      return;
    }
    await refreshOutbox();
  });
  return item;
}

// --- figures and formats --------------------------------------------------------------------

function renderFigures() {
  $("live-count").textContent = String(live.size);
  $("no-live").hidden = live.size > 0;
  $("recent-count").textContent = String(recent.length);
  $("cost-total").textContent = dollars(recent.reduce((sum, call) => sum + (call.cost_usd || 0), 0));
  const waits = [...recent, ...[...live.values()].map((entry) => entry.call)]
    .flatMap((call) => call.turns.map((turn) => turn.latency_ms))
    .sort((a, b) => a - b);
  $("latency-median").textContent = waits.length ? seconds(waits[Math.floor(waits.length / 2)]) : "–";
}

/** "••• 0001", and the store it called where there are several ("••• 0001 · Downtown"). */
function callerLabel(masked, store) {
  const caller = masked && masked.startsWith("***") ? `••• ${masked.slice(3)}` : masked || "unknown";
  return store ? `${caller} · ${store}` : caller;
}

function duration(totalSeconds) {
  const whole = Math.max(0, Math.floor(totalSeconds));
  return `${Math.floor(whole / 60)}:${String(whole % 60).padStart(2, "0")}`;
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(2)} s`;
}

function dollars(usd) {
  if (usd === null || usd === undefined) return "–";
  return usd > 0 && usd < 0.01 ? `$${usd.toFixed(4)}` : money.format(usd);
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

connect();
refreshOutbox();
setInterval(refreshOutbox, OUTBOX_POLL_MS);
setInterval(() => {
  for (const { element, call } of live.values()) tick(element, call);
}, 1000);
