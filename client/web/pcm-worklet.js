// AudioWorklet: microphone samples -> 16 kHz mono LINEAR16, posted in 160 ms buffers as
// {pcm: ArrayBuffer, level: RMS level of the buffer in dBFS (-Infinity for digital silence)}.
//
// The page asks for a 16 kHz AudioContext, so the browser's own resampler usually does
// the work and this is a plain float -> int16 conversion. Where a browser runs the context
// at the device's rate instead, each output sample is the mean of the input samples it
// covers (a box filter: crude, but enough for speech). Channels are averaged.
// Message 'flush' posts the partial buffer, then 'flushed'.

class Pcm16Processor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.step = sampleRate / (opts.targetRate || 16000); // input samples per output sample
    this.buffer = new Int16Array(opts.bufferSamples || 2560);
    this.filled = 0;
    this.phase = 0;
    this.sum = 0;
    this.count = 0;
    this.last = 0;
    this.port.onmessage = (event) => {
      if (event.data === 'flush') {
        this.post();
        this.port.postMessage('flushed');
      }
    };
  }

  push(x) {
    const v = Math.round(Math.max(-1, Math.min(1, x)) * 32768);
    this.buffer[this.filled++] = Math.min(32767, v);
    if (this.filled === this.buffer.length) this.post();
  }

  post() {
    if (!this.filled) return;
    const out = this.buffer.slice(0, this.filled);
    let energy = 0;
    for (const v of out) energy += v * v;
    const level = 10 * Math.log10(energy / out.length / (32768 * 32768));
    this.port.postMessage({pcm: out.buffer, level}, [out.buffer]);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const frames = channels[0].length;
    for (let i = 0; i < frames; i++) {
      let x = 0;
      for (const ch of channels) x += ch[i];
      x /= channels.length;
      if (this.step === 1) {
        this.push(x);
        continue;
      }
      this.sum += x;
      this.count++;
      this.phase += 1;
      while (this.phase >= this.step) {
        if (this.count) this.last = this.sum / this.count;
        this.push(this.last);
        this.phase -= this.step;
        this.sum = 0;
        this.count = 0;
      }
    }
    return true;
  }
}

registerProcessor('pcm16', Pcm16Processor);
