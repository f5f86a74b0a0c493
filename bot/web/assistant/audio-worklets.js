// AudioWorklet processors for the assistant: the microphone as PCM16 24 kHz, and the bot's
// PCM16 24 kHz voice played at the device's rate. Both resample with the same windowed-sinc
// filter, so the device may run at any rate (48 kHz, 44.1 kHz, ...) without aliasing.
// Loaded with audioWorklet.addModule(); `sampleRate` is the AudioContext's rate.

const ZERO_CROSSINGS = 16; // filter half-length, in zero crossings of the sinc
const PHASES = 256; // fractional positions tabulated between two input samples
const PASSBAND = 0.9; // cut-off (-6 dB) as a fraction of the lower Nyquist frequency

function blackman(u) {
  return Math.abs(u) >= 1 ? 0 : 0.42 + 0.5 * Math.cos(Math.PI * u) + 0.08 * Math.cos(2 * Math.PI * u);
}

function sinc(x) {
  return x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
}

/** A streaming band-limited resampler: state is carried between blocks, any rate ratio. */
class Resampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate; // input samples per output sample
    this.passthrough = inRate === outRate;
    const cutoff = Math.min(1, outRate / inRate) * PASSBAND;
    this.half = Math.ceil(ZERO_CROSSINGS / cutoff);
    this.taps = 2 * this.half;
    this.table = new Float32Array((PHASES + 1) * this.taps);
    for (let phase = 0; phase <= PHASES; phase++) {
      const frac = phase / PHASES;
      for (let j = 0; j < this.taps; j++) {
        const t = frac + this.half - 1 - j; // distance from input sample j to the output position
        this.table[phase * this.taps + j] = cutoff * sinc(cutoff * t) * blackman(t / this.half);
      }
    }
    this.reset();
  }

  reset() {
    this.buffer = new Float32Array(4096);
    this.length = this.half - 1; // zeros before the first sample: the filter's history
    this.buffer.fill(0, 0, this.length);
    this.position = this.half - 1; // where the next output falls, in buffer samples
  }

  /** Resamples `input` (Float32Array); returns the output samples it completes. */
  push(input) {
    if (this.passthrough) return Float32Array.from(input);
    if (this.length + input.length > this.buffer.length) {
      const grown = new Float32Array(2 * (this.length + input.length));
      grown.set(this.buffer.subarray(0, this.length));
      this.buffer = grown;
    }
    this.buffer.set(input, this.length);
    this.length += input.length;
    const available = Math.max(0, Math.ceil((this.length - this.half - this.position) / this.step) + 1);
    const output = new Float32Array(available);
    let count = 0;
    while (count < available) {
      const whole = Math.floor(this.position);
      if (whole + this.half >= this.length) break;
      const row = Math.round((this.position - whole) * PHASES) * this.taps;
      const first = whole - this.half + 1;
      let sum = 0;
      for (let j = 0; j < this.taps; j++) sum += this.buffer[first + j] * this.table[row + j];
      output[count++] = sum;
      this.position += this.step;
    }
    const keepFrom = Math.max(0, Math.floor(this.position) - this.half + 1);
    this.buffer.copyWithin(0, keepFrom, this.length);
    this.length -= keepFrom;
    this.position -= keepFrom;
    return output.subarray(0, count);
  }

  /** The samples still held back by the filter, followed by silence. */
  drain() {
    return this.push(new Float32Array(this.half + Math.ceil(this.step)));
  }
}

/** Microphone -> PCM16 24 kHz, posted as one ArrayBuffer per `chunkMs` of audio. */
class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { outputRate, chunkMs } = options.processorOptions;
    this.resampler = new Resampler(sampleRate, outputRate);
    this.chunkSamples = Math.round((outputRate * chunkMs) / 1000);
    this.chunk = new Int16Array(this.chunkSamples);
    this.filled = 0;
  }

  process(inputs, outputs) {
    const channels = inputs[0];
    if (channels && channels.length > 0) {
      let mono = channels[0];
      if (channels.length > 1) {
        mono = new Float32Array(mono.length);
        for (const channel of channels) for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / channels.length;
      }
      for (const sample of this.resampler.push(mono)) {
        const clamped = Math.max(-1, Math.min(1, sample));
        this.chunk[this.filled++] = clamped < 0 ? clamped * 0x8000 : clamped * 0x7fff;
        if (this.filled === this.chunkSamples) {
          this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]);
          this.chunk = new Int16Array(this.chunkSamples);
          this.filled = 0;
        }
      }
    }
    outputs[0].forEach((channel) => channel.fill(0));
    return true;
  }
}

/**
 * PCM16 24 kHz chunks of the bot's items -> the device, counting what was really played.
 *
 * In: {type: "chunk", itemId, samples: Int16Array}, {type: "end", itemId}, {type: "flush", id}.
 * Out: {type: "flushed", id, itemId, playedMs, unplayed} once the queue is dropped (barge-in;
 * `unplayed`: some of that item's audio was still waiting), and
 * {type: "progress", itemId, playedMs, playing} about every 100 ms and when playback stops.
 */
class PcmPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.resampler = new Resampler(options.processorOptions.inputRate, sampleRate);
    this.queue = []; // {itemId, samples: Float32Array, offset}
    this.playedFrames = new Map(); // itemId -> device frames played
    this.lastItemId = null;
    this.playing = false;
    this.sinceProgress = 0;
    this.port.onmessage = (event) => this.receive(event.data);
  }

  receive(message) {
    if (message.type === "chunk") {
      const floats = new Float32Array(message.samples.length);
      for (let i = 0; i < floats.length; i++) floats[i] = message.samples[i] / 0x8000;
      this.enqueue(message.itemId, this.resampler.push(floats));
    } else if (message.type === "end") {
      this.enqueue(message.itemId, this.resampler.drain());
      this.resampler.reset();
    } else if (message.type === "flush") {
      const head = this.queue[0];
      const itemId = head ? head.itemId : this.lastItemId;
      this.queue = [];
      this.resampler.reset();
      const playedMs = this.playedMs(itemId);
      this.port.postMessage({ type: "flushed", id: message.id, itemId, playedMs, unplayed: Boolean(head) });
      this.report(false);
    }
  }

  enqueue(itemId, samples) {
    if (samples.length > 0) this.queue.push({ itemId, samples, offset: 0 });
  }

  playedMs(itemId) {
    return itemId == null ? 0 : Math.floor(((this.playedFrames.get(itemId) || 0) * 1000) / sampleRate);
  }

  report(playing) {
    this.playing = playing;
    this.sinceProgress = 0;
    this.port.postMessage({ type: "progress", itemId: this.lastItemId, playedMs: this.playedMs(this.lastItemId), playing });
  }

  process(inputs, outputs) {
    const output = outputs[0][0];
    let written = 0;
    while (written < output.length && this.queue.length > 0) {
      const head = this.queue[0];
      const count = Math.min(output.length - written, head.samples.length - head.offset);
      output.set(head.samples.subarray(head.offset, head.offset + count), written);
      head.offset += count;
      written += count;
      this.lastItemId = head.itemId;
      this.playedFrames.set(head.itemId, (this.playedFrames.get(head.itemId) || 0) + count);
      if (head.offset === head.samples.length) this.queue.shift();
    }
    output.fill(0, written);
    for (let channel = 1; channel < outputs[0].length; channel++) outputs[0][channel].set(output);
    const playing = written > 0;
    this.sinceProgress += output.length;
    if (playing !== this.playing || (playing && this.sinceProgress >= sampleRate / 10)) this.report(playing);
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
registerProcessor("pcm-player", PcmPlayer);
