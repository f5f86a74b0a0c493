// The browser's audio for the Realtime API: the microphone as PCM16 24 kHz chunks, and the
// bot's PCM16 24 kHz voice on the speakers, through the AudioWorklets in audio-worklets.js.
// One AudioContext at the device's own rate; the worklets resample both ways.

export const PCM_RATE_HZ = 24000;
const CAPTURE_CHUNK_MS = 20;

export class AudioIO {
  #workletUrl;
  #onProgress;
  #context = null;
  #ready = null;
  #player = null;
  #capture = null;
  #source = null;
  #stream = null;
  #flushes = new Map();
  #nextFlushId = 0;

  /** `onProgress({itemId, playedMs, playing})`: the bot's voice, as the speakers play it. */
  constructor({ workletUrl, onProgress = () => {} }) {
    this.#workletUrl = workletUrl;
    this.#onProgress = onProgress;
  }

  /** Creates (or resumes) the AudioContext; call it from a click or key press (autoplay rules). */
  unlock() {
    if (this.#ready === null) this.#ready = this.#start();
    if (this.#context && this.#context.state === "suspended") this.#context.resume();
    return this.#ready;
  }

  get sampleRate() {
    return this.#context ? this.#context.sampleRate : null;
  }

  async #start() {
    // Outside a click the context stays suspended; queued audio plays once a click resumes it.
    const context = new AudioContext({ latencyHint: "interactive" });
    this.#context = context;
    context.resume();
    await context.audioWorklet.addModule(this.#workletUrl);
    this.#player = new AudioWorkletNode(context, "pcm-player", {
      numberOfInputs: 0,
      outputChannelCount: [1],
      processorOptions: { inputRate: PCM_RATE_HZ },
    });
    this.#player.port.onmessage = (event) => this.#fromPlayer(event.data);
    this.#player.connect(context.destination);
  }

  #fromPlayer(message) {
    if (message.type === "progress") {
      this.#onProgress(message);
    } else if (message.type === "flushed") {
      const resolve = this.#flushes.get(message.id);
      this.#flushes.delete(message.id);
      if (resolve) resolve(message);
    }
  }

  /** Queues PCM16 24 kHz samples (Int16Array) of one output item for the speakers. */
  async play(itemId, samples) {
    await this.unlock();
    this.#player.port.postMessage({ type: "chunk", itemId, samples }, [samples.buffer]);
  }

  /** The item's audio is complete: play out what the filter still holds. */
  async endItem(itemId) {
    if (this.#ready === null) return;
    await this.#ready;
    this.#player.port.postMessage({ type: "end", itemId });
  }

  /** Silences the bot at once; resolves with {itemId, playedMs, unplayed} for the truncate. */
  async stopPlayback() {
    if (this.#ready === null) return null;
    await this.#ready;
    const id = ++this.#nextFlushId;
    const flushed = new Promise((resolve) => this.#flushes.set(id, resolve));
    this.#player.port.postMessage({ type: "flush", id });
    return flushed;
  }

  /** Opens the microphone; `onChunk(ArrayBuffer)` gets PCM16 24 kHz, 20 ms at a time. */
  async startCapture(onChunk) {
    await this.unlock();
    if (this.#stream !== null) return;
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    this.#stream = stream;
    this.#source = this.#context.createMediaStreamSource(stream);
    this.#capture = new AudioWorkletNode(this.#context, "pcm-capture", {
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { outputRate: PCM_RATE_HZ, chunkMs: CAPTURE_CHUNK_MS },
    });
    this.#capture.port.onmessage = (event) => onChunk(event.data);
    this.#source.connect(this.#capture);
    // A node must lead to the destination to be processed; it only ever writes silence.
    this.#capture.connect(this.#context.destination);
  }

  /** Mute (false) or unmute (true) the microphone without closing it. */
  setCaptureEnabled(enabled) {
    if (this.#stream === null) return;
    for (const track of this.#stream.getAudioTracks()) track.enabled = enabled;
  }

  get capturing() {
    return this.#stream !== null;
  }

  stopCapture() {
    if (this.#stream === null) return;
    for (const track of this.#stream.getTracks()) track.stop();
    this.#source.disconnect();
    this.#capture.port.onmessage = null;
    this.#capture.disconnect();
    this.#stream = this.#source = this.#capture = null;
  }
}
