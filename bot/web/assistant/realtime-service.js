// RealtimeService: the seed's browser client of the OpenAI Realtime API (GA, WebSocket).
//
// It gets an ephemeral client secret from the app (GET /session, never cached: a new one for
// every connection), talks to the Realtime API directly (subprotocols `realtime` and
// `openai-insecure-api-key.<secret>`), streams the microphone and plays the bot's voice as
// PCM16 24 kHz through AudioWorklets, and runs the model's tool calls through the app
// (POST /assistant/tools/{name}). Product data reaches the page through onMetadata as the seed's
// ProductsCollection; the model only ever gets a short spoken-style summary of it.
//
// Callbacks given to connect():
//   onConnected({reconnected})                  a Realtime session is open
//   onDisconnected({reason, reconnecting})      the socket is gone; `reconnecting`: a retry is on its way
//   onError(error)                              `error.message` for people; `error.status` (HTTP, or 0),
//                                               `error.retryInMs` when the service retries by itself
//   onMessage({id, role, text, done})           the conversation as text, updated as it streams
//   onMetadata(collection)                      a ProductsCollection the model chose to show
//   onAudioResponse({itemId, samples, sampleRate})  each chunk of the bot's voice (already playing)
//   onPlayback({itemId, playedMs, playing})     what the speakers have played (optional)

import { AudioIO, PCM_RATE_HZ } from "./audio-io.js";

const DEFAULT_QUERY_TIMEOUT_MS = 10000;
const TOOL_TIMEOUT_MS = 20000; // a tool the app cannot answer in time is reported to the model as failed
const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 15000;
const RETRY_AFTER_MAX_MS = 60000;
const HISTORY_ITEMS_KEPT = 12; // the conversation re-told to a new session after a reconnect
const REALTIME_SUBPROTOCOL = "realtime";
const KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key.";
// Answers to a race the client cannot avoid (a cancel just after the response ended).
const HARMLESS_ERROR_CODES = new Set(["response_cancel_not_active"]);

/** Why a connection attempt failed: `status` is the HTTP status (0: no answer at all). */
export class ConnectionError extends Error {
  constructor(message, { status = 0, retryAfterMs = null } = {}) {
    super(message);
    this.name = "ConnectionError";
    this.status = status;
    this.retryAfterMs = retryAfterMs;
    this.retryInMs = null;
  }
}

export class RealtimeService {
  static #instance = null;

  /** The one service of the page (options apply to the first call only). */
  static getInstance(options = {}) {
    if (RealtimeService.#instance === null) RealtimeService.#instance = new RealtimeService(options);
    return RealtimeService.#instance;
  }

  #sessionUrl;
  #toolsUrl;
  #store;
  #callbacks = {};
  #audio;
  #ws = null;
  #generation = 0;
  #wanted = false;
  #attempt = 0;
  #retryTimer = null;
  #everConnected = false;
  #connectWaiters = [];
  #status = { isConnected: false, isConnecting: false, hasSession: false };
  #responseActive = false;
  #responseWanted = false;
  #toolCalls = [];
  #turn = null; // {ended, end} from a response's start until its tool outputs are sent
  #questionsWaiting = 0;
  #receivedMs = new Map();
  #playedMs = new Map();
  #audioDone = new Set();
  #silenced = new Set();
  #transcripts = new Map();
  #history = [];
  #localIds = 0;
  #metadataWaiters = new Set();
  #micWanted = false;
  #muted = false;
  #stats = { receivedMs: 0, playedMs: 0, truncations: 0 };

  constructor({
    sessionUrl = new URL("../session", import.meta.url).href,
    toolsUrl = new URL("tools/", import.meta.url).href,
    workletUrl = new URL("audio-worklets.js", import.meta.url).href,
    store = null,
  } = {}) {
    this.#sessionUrl = sessionUrl;
    this.#toolsUrl = toolsUrl;
    this.#store = store;
    this.#audio = new AudioIO({ workletUrl, onProgress: (progress) => this.#onPlayback(progress) });
  }

  // --- the seed's interface ------------------------------------------------------------------

  /** Opens a session and keeps one open (reconnecting by itself) until disconnect().
   * Resolves true once connected, or false if disconnect() came first. */
  connect(callbacks = {}) {
    this.#callbacks = callbacks;
    const connected = new Promise((resolve) => {
      if (this.#status.isConnected) resolve(true);
      else this.#connectWaiters.push(resolve);
    });
    if (!this.#wanted) {
      this.#wanted = true;
      this.#attempt = 0;
      this.#open();
    }
    return connected;
  }

  disconnect() {
    this.#wanted = false;
    this.#everConnected = false;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.stopMicrophone();
    const ws = this.#ws;
    this.#dropSocket("disconnected");
    if (ws !== null) ws.close(1000, "client disconnected");
    for (const resolve of this.#connectWaiters.splice(0)) resolve(false);
    this.#setStatus({ isConnected: false, isConnecting: false, hasSession: false });
    this.#emit("onDisconnected", { reason: "disconnected", reconnecting: false });
  }

  /** Sends a typed question; the bot answers it, interrupting itself if it was still speaking.
   * Throws at once when there is nothing to send or no session; resolves once the question is sent
   * (after the response it interrupts has ended and that response's tool outputs are sent). */
  sendMessage(text) {
    const question = String(text ?? "").trim();
    if (question === "") throw new Error("Type a question first.");
    if (!this.#status.hasSession) throw new ConnectionError("Not connected yet: wait a moment and try again.");
    this.#audio.unlock();
    if (this.#responseActive) this.#send({ type: "response.cancel" });
    this.#emit("onMessage", { id: `typed-${++this.#localIds}`, role: "user", text: question, done: true });
    this.#remember("user", question);
    const generation = this.#generation;
    this.#questionsWaiting += 1;
    // The user is done listening: cut the voice, and the model's copy of it; and let the response
    // end and its tool outputs go first. The model reads the question last, and one response
    // answers it with those outputs in view.
    const turnEnded = this.#turn === null ? null : this.#turn.ended;
    return Promise.all([this.#bargeIn(), turnEnded])
      .finally(() => {
        this.#questionsWaiting -= 1;
      })
      .then(() => {
        if (generation !== this.#generation) return;
        const content = [{ type: "input_text", text: question }];
        this.#send({ type: "conversation.item.create", item: { type: "message", role: "user", content } });
        this.#requestResponse();
      });
  }

  getConnectionStatus() {
    return { ...this.#status };
  }

  /** Asks `text` and resolves with the next ProductsCollection, or rejects after `timeoutMs`. */
  queryWithResponse(text, timeoutMs = DEFAULT_QUERY_TIMEOUT_MS) {
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject, timer: null };
      waiter.timer = setTimeout(() => {
        this.#metadataWaiters.delete(waiter);
        const error = new Error(`No products came within ${timeoutMs} ms.`);
        error.name = "TimeoutError";
        reject(error);
      }, timeoutMs);
      this.#metadataWaiters.add(waiter);
      try {
        this.sendMessage(text);
      } catch (error) {
        clearTimeout(waiter.timer);
        this.#metadataWaiters.delete(waiter);
        reject(error);
      }
    });
  }

  // --- microphone (open mic: the server's VAD decides when a turn ends) -------------------------

  /** Opens the microphone (call it from a click); its audio streams while connected and unmuted. */
  async startMicrophone() {
    this.#micWanted = true;
    this.#muted = false;
    await this.#audio.startCapture((chunk) => this.#sendAudio(chunk));
    this.#audio.setCaptureEnabled(true);
  }

  setMuted(muted) {
    this.#muted = Boolean(muted);
    this.#audio.setCaptureEnabled(!this.#muted);
  }

  stopMicrophone() {
    this.#micWanted = false;
    this.#audio.stopCapture();
  }

  getMicrophoneState() {
    if (!this.#micWanted || !this.#audio.capturing) return "off";
    return this.#muted ? "muted" : "live";
  }

  /** Lets the bot's voice play: call it from a click or key press (browsers' autoplay rules). */
  unlockAudio() {
    return this.#audio.unlock();
  }

  /** Milliseconds of the bot's voice received and played, and truncations sent (barge-ins). */
  getAudioStats() {
    return { ...this.#stats };
  }

  // --- connecting ----------------------------------------------------------------------------

  async #open() {
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    const generation = ++this.#generation;
    this.#setStatus({ isConnected: false, isConnecting: true, hasSession: false });
    let session;
    try {
      session = await this.#fetchSession();
    } catch (error) {
      if (generation === this.#generation && this.#wanted) this.#retryLater(error);
      return;
    }
    if (generation !== this.#generation || !this.#wanted) return;
    const protocols = [REALTIME_SUBPROTOCOL, KEY_SUBPROTOCOL_PREFIX + session.value];
    let ws;
    try {
      ws = new WebSocket(session.realtime_url, protocols);
    } catch (error) {
      this.#retryLater(new ConnectionError(`Cannot open the Realtime socket: ${error.message}`));
      return;
    }
    this.#ws = ws;
    ws.onmessage = (event) => {
      if (ws === this.#ws) this.#receive(event.data);
    };
    ws.onclose = (event) => {
      if (ws === this.#ws) this.#closed(event);
    };
  }

  /** A fresh client secret and where it is valid. Never cached. */
  async #fetchSession() {
    let response;
    try {
      response = await fetch(this.#forStore(this.#sessionUrl), { cache: "no-store", credentials: "same-origin" });
    } catch {
      throw new ConnectionError("The assistant's server did not answer. Check your connection.");
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok || typeof body?.value !== "string" || typeof body?.realtime_url !== "string") {
      const retryAfter = Number(response.headers.get("Retry-After"));
      const reason = typeof body?.error === "string" ? body.error : `HTTP ${response.status}`;
      throw new ConnectionError(sessionRefusal(response.status, reason), {
        status: response.status,
        retryAfterMs: Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter * 1000 : null,
      });
    }
    return body;
  }

  #retryLater(error) {
    const backoff = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** this.#attempt) * (0.75 + Math.random() / 2);
    this.#attempt += 1;
    const delayMs = Math.round(error.retryAfterMs != null ? Math.min(error.retryAfterMs, RETRY_AFTER_MAX_MS) : backoff);
    error.retryInMs = delayMs;
    this.#setStatus({ isConnected: false, isConnecting: false, hasSession: false });
    this.#emit("onError", error);
    this.#retryTimer = setTimeout(() => this.#open(), delayMs);
  }

  #connected() {
    const reconnected = this.#everConnected;
    this.#everConnected = true;
    this.#attempt = 0;
    this.#setStatus({ isConnected: true, isConnecting: false, hasSession: true });
    // A new session knows nothing: tell it the conversation so far, as text.
    for (const { role, text } of this.#history) {
      const content = [{ type: role === "user" ? "input_text" : "output_text", text }];
      this.#send({ type: "conversation.item.create", item: { type: "message", role, content } });
    }
    for (const resolve of this.#connectWaiters.splice(0)) resolve(true);
    this.#emit("onConnected", { reconnected });
  }

  #closed(event) {
    const opened = this.#status.hasSession;
    const reason = event.reason || (opened ? "the connection was lost" : "the Realtime API refused the connection");
    this.#dropSocket(reason);
    if (!this.#wanted) return;
    if (opened) {
      this.#emit("onDisconnected", { reason, reconnecting: true });
      this.#retryLater(new ConnectionError(`Connection lost (${reason}). Reconnecting.`));
    } else {
      this.#retryLater(new ConnectionError(`The Realtime API refused the connection (code ${event.code}).`));
    }
  }

  /** Forgets everything tied to the socket that is gone; waiting queries fail at once. */
  #dropSocket(reason) {
    this.#ws = null;
    this.#generation += 1;
    this.#responseActive = this.#responseWanted = false;
    this.#toolCalls = [];
    this.#endTurn();
    this.#audio.stopPlayback();
    this.#setStatus({ isConnected: false, isConnecting: false, hasSession: false });
    for (const waiter of this.#metadataWaiters) {
      clearTimeout(waiter.timer);
      waiter.reject(new ConnectionError(`No products: ${reason}.`));
    }
    this.#metadataWaiters.clear();
  }

  // --- server events -------------------------------------------------------------------------

  #receive(data) {
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return;
    }
    const handler = this.#handlers[event.type];
    if (handler) handler.call(this, event);
  }

  #handlers = {
    "session.created": () => this.#connected(),
    error: (event) => {
      if (HARMLESS_ERROR_CODES.has(event.error?.code)) return;
      const error = new Error(event.error?.message || "The Realtime API reported an error.");
      error.code = event.error?.code ?? null;
      error.status = 0;
      this.#emit("onError", error);
    },
    "input_audio_buffer.speech_started": () => this.#bargeIn(),
    "input_audio_buffer.committed": (event) => {
      this.#emit("onMessage", { id: event.item_id, role: "user", text: "", done: false });
    },
    "conversation.item.input_audio_transcription.delta": (event) => {
      this.#appendText(event.item_id, "user", event.delta);
    },
    "conversation.item.input_audio_transcription.completed": (event) => {
      this.#finishText(event.item_id, "user", event.transcript);
    },
    "response.created": () => this.#startTurn(),
    "response.output_audio.delta": (event) => this.#playDelta(event),
    "response.output_audio.done": (event) => {
      this.#audioDone.add(event.item_id);
      if (!this.#silenced.has(event.item_id)) this.#audio.endItem(event.item_id);
    },
    "response.output_audio_transcript.delta": (event) => this.#appendText(event.item_id, "assistant", event.delta),
    "response.output_audio_transcript.done": (event) => this.#finishText(event.item_id, "assistant", event.transcript),
    "response.output_text.delta": (event) => this.#appendText(event.item_id, "assistant", event.delta),
    "response.output_text.done": (event) => this.#finishText(event.item_id, "assistant", event.text),
    "response.function_call_arguments.done": (event) => {
      // Started at once, so the cards can show while the response is still finishing.
      this.#toolCalls.push({ callId: event.call_id, output: this.#runTool(event.name, event.arguments) });
    },
    "response.done": (event) => this.#responseDone(event.response),
  };

  async #responseDone(response) {
    const generation = this.#generation;
    this.#responseActive = false;
    const calls = this.#toolCalls.splice(0);
    const outputs = await Promise.all(calls.map((call) => call.output));
    if (generation !== this.#generation) return;
    calls.forEach((call, index) => {
      const item = { type: "function_call_output", call_id: call.callId, output: outputs[index] };
      this.#send({ type: "conversation.item.create", item });
    });
    // The model speaks about tool results in a response of its own, and a question that waited
    // for this response to end wants one too.
    const wanted = (calls.length > 0 && response?.status === "completed") || this.#responseWanted;
    if (this.#responseActive) {
      // Another response began meanwhile (the server's turn detection): its end asks.
      this.#responseWanted = wanted;
      return;
    }
    this.#responseWanted = false;
    this.#endTurn();
    // A question on its way asks for the response itself, after it, so nothing is asked twice.
    if (wanted && this.#questionsWaiting === 0) this.#requestResponse();
  }

  /** One response at a time: asked for while one is on, it is asked for when that one ends. */
  #requestResponse() {
    if (this.#turn !== null) {
      this.#responseWanted = true;
      return;
    }
    this.#startTurn();
    this.#send({ type: "response.create" });
  }

  #startTurn() {
    this.#responseActive = true;
    if (this.#turn !== null) return;
    let end;
    const ended = new Promise((resolve) => {
      end = resolve;
    });
    this.#turn = { ended, end };
  }

  #endTurn() {
    const turn = this.#turn;
    this.#turn = null;
    turn?.end();
  }

  // --- tools ---------------------------------------------------------------------------------

  /** The app's URL for this page's store (`?store=<id>`; none: the default store). */
  #forStore(url) {
    if (!this.#store) return url;
    const withStore = new URL(url, location.href);
    withStore.searchParams.set("store", this.#store);
    return withStore.href;
  }

  /** Runs a tool call through the app; always resolves with an output the model can read. */
  async #runTool(name, args) {
    let response;
    let body = null;
    try {
      response = await fetch(this.#forStore(this.#toolsUrl + encodeURIComponent(name)), {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ arguments: args }),
        credentials: "same-origin",
        signal: AbortSignal.timeout(TOOL_TIMEOUT_MS),
      });
      body = await response.json();
    } catch {
      body = null;
    }
    if (body !== null && typeof body.output === "string") {
      if (body.collection) this.#deliverMetadata(body.collection);
      return body.output;
    }
    const reason = typeof body?.error === "string" ? body.error : response ? `HTTP ${response.status}` : "no answer";
    return JSON.stringify({ error: `${name} could not run (${reason}). Apologize and offer another way to help.` });
  }

  #deliverMetadata(collection) {
    this.#emit("onMetadata", collection);
    for (const waiter of this.#metadataWaiters) {
      clearTimeout(waiter.timer);
      waiter.resolve(collection);
    }
    this.#metadataWaiters.clear();
  }

  // --- audio ---------------------------------------------------------------------------------

  #playDelta(event) {
    if (this.#silenced.has(event.item_id)) return;
    const samples = decodePcm16(event.delta);
    const ms = (samples.length * 1000) / PCM_RATE_HZ;
    this.#receivedMs.set(event.item_id, (this.#receivedMs.get(event.item_id) || 0) + ms);
    this.#stats.receivedMs += ms;
    this.#emit("onAudioResponse", { itemId: event.item_id, samples: samples.slice(), sampleRate: PCM_RATE_HZ });
    this.#audio.play(event.item_id, samples);
  }

  #onPlayback(progress) {
    if (progress.itemId != null) {
      this.#playedMs.set(progress.itemId, progress.playedMs);
      this.#stats.playedMs = [...this.#playedMs.values()].reduce((sum, ms) => sum + ms, 0);
    }
    this.#emit("onPlayback", progress);
  }

  /** The user talks over the bot: silence it now, and tell the model what was really heard. */
  async #bargeIn() {
    const generation = this.#generation;
    const flushed = await this.#audio.stopPlayback();
    if (flushed === null || flushed.itemId == null || generation !== this.#generation) return;
    const { itemId, playedMs, unplayed } = flushed;
    this.#silenced.add(itemId);
    const receivedMs = Math.floor(this.#receivedMs.get(itemId) || 0);
    if (!unplayed && this.#audioDone.has(itemId)) return; // heard to the end: nothing to correct
    this.#stats.truncations += 1;
    const audioEndMs = Math.min(playedMs, receivedMs);
    this.#send({ type: "conversation.item.truncate", item_id: itemId, content_index: 0, audio_end_ms: audioEndMs });
  }

  #sendAudio(chunk) {
    if (!this.#status.hasSession || this.#muted || !this.#micWanted) return;
    this.#send({ type: "input_audio_buffer.append", audio: encodeBase64(chunk) });
  }

  // --- plumbing ------------------------------------------------------------------------------

  #appendText(id, role, delta) {
    const text = (this.#transcripts.get(id) || "") + (delta || "");
    this.#transcripts.set(id, text);
    this.#emit("onMessage", { id, role, text, done: false });
  }

  #finishText(id, role, text) {
    const final = text ?? this.#transcripts.get(id) ?? "";
    this.#transcripts.delete(id);
    this.#emit("onMessage", { id, role, text: final, done: true });
    if (final.trim() !== "") this.#remember(role, final);
  }

  #remember(role, text) {
    this.#history.push({ role, text });
    if (this.#history.length > HISTORY_ITEMS_KEPT) this.#history.splice(0, this.#history.length - HISTORY_ITEMS_KEPT);
  }

  #send(event) {
    const ws = this.#ws;
    if (ws === null || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(event));
    return true;
  }

  #setStatus(status) {
    this.#status = status;
  }

  #emit(name, payload) {
    const callback = this.#callbacks[name];
    if (typeof callback !== "function") return;
    try {
      callback(payload);
    } catch (error) {
      console.error(`${name} callback failed`, error);
    }
  }
}

/** A sentence for people, from the app's /session answer. */
function sessionRefusal(status, answer) {
  const reason = answer.replace(/[.\s]+$/, "");
  if (status === 429) return "Too many requests right now.";
  if (status === 403) return "This page's address is not allowed to use the assistant (CORS_ORIGINS).";
  if (status >= 500 || status === 0) return `The assistant is unavailable: ${reason}.`;
  return `The assistant could not start: ${reason}.`;
}

function decodePcm16(base64) {
  const binary = atob(base64);
  const bytes = new Uint8Array(binary.length & ~1);
  for (let i = 0; i < bytes.length; i++) bytes[i] = binary.charCodeAt(i);
  return new Int16Array(bytes.buffer); // little-endian, as every browser platform is
}

function encodeBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}
