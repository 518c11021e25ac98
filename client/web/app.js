// The page: microphone -> AudioWorklet (16 kHz LINEAR16) -> WebSocket bridge -> asr.v1 server,
// and results back: interim text on one line, finals in a list, each with the server's latency.
// document.body.dataset.state: idle -> starting -> streaming -> finishing -> done | error.

const $ = (id) => document.getElementById(id);
const RATE = 16000;
let session = null;
let latencies = [];

function setState(state, status) {
  document.body.dataset.state = state;
  $('status').textContent = status;
  $('toggle').textContent = state === 'streaming' ? 'Stop' : 'Start';
  $('toggle').disabled = state === 'starting' || state === 'finishing';
}

function percentile(values, q) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

function showTiming(r) {
  latencies.push(r.latency_ms);
  const bridge = r.bridge_latency_ms === null ? '' : ` · via the bridge ${r.bridge_latency_ms.toFixed(0)} ms`;
  $('stats').textContent =
    `last result: server ${r.latency_ms.toFixed(0)} ms (queue ${r.queue_wait_ms.toFixed(0)} ms, ` +
    `compute ${r.compute_ms.toFixed(0)} ms, batch of ${r.batch_size})${bridge} · ` +
    `server latency over ${latencies.length} results: p50 ${percentile(latencies, 0.5).toFixed(0)} ms, ` +
    `max ${Math.max(...latencies).toFixed(0)} ms · ${(session ? session.sent / RATE : 0).toFixed(1)} s of audio sent`;
}

function onResult(r) {
  showTiming(r);
  if (!r.is_final) {
    $('interim').textContent = r.transcript;
    return;
  }
  $('interim').textContent = '';
  if (!r.transcript) return;
  const li = document.createElement('li');
  const text = document.createElement('span');
  text.className = 'text';
  text.textContent = r.transcript;
  const latency = document.createElement('span');
  latency.className = 'latency';
  latency.textContent = `${r.latency_ms.toFixed(0)} ms`;
  latency.title = `queue ${r.queue_wait_ms} ms, compute ${r.compute_ms} ms, batch of ${r.batch_size}`;
  li.append(text, latency);
  $('finals').append(li);
}

function onMessage(event) {
  const msg = JSON.parse(event.data);
  if (msg.type === 'ready') {
    $('model').textContent = `Model: ${msg.model}.`;
    setState('streaming', 'listening…');
  } else if (msg.type === 'result') {
    onResult(msg);
  } else if (msg.type === 'end') {
    session.ended = true;
    setState('done', 'done');
  } else if (msg.type === 'error') {
    session.ended = true;
    setState('error', `error: ${msg.code}: ${msg.message}`);
  }
}

function releaseAudio(s) {
  s.media.getTracks().forEach((t) => t.stop());
  s.context.close();
}

async function openAudio() {
  const media = await navigator.mediaDevices.getUserMedia(
    {audio: {channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false}});
  // A 16 kHz context lets the browser resample; browsers that cannot record into it get
  // a context at the device's rate and the worklet resamples.
  for (const options of [{sampleRate: RATE}, {}]) {
    let context;
    try {
      context = new AudioContext(options);
      await context.audioWorklet.addModule('/static/pcm-worklet.js');
      const source = context.createMediaStreamSource(media);
      const node = new AudioWorkletNode(context, 'pcm16', {processorOptions: {targetRate: RATE}});
      return {media, context, source, node};
    } catch (err) {
      if (context) context.close();
      if (options.sampleRate === undefined) throw err;
    }
  }
}

async function start() {
  setState('starting', 'asking for the microphone…');
  latencies = [];
  $('finals').textContent = '';
  $('interim').textContent = '';
  $('stats').textContent = '';
  let audio;
  try {
    audio = await openAudio();
  } catch (err) {
    setState('error', `no microphone: ${err.message}`);
    return;
  }
  const ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`);
  session = {...audio, ws, sent: 0, ended: false};
  const s = session;
  ws.onopen = () => {
    ws.send(JSON.stringify({sample_rate: RATE, beam: Number($('decoding').value)}));
    s.node.port.onmessage = (event) => {
      if (event.data === 'flushed') {
        ws.send('end');
      } else if (ws.readyState === WebSocket.OPEN) {
        ws.send(event.data);
        s.sent += event.data.byteLength / 2;
      }
    };
    s.source.connect(s.node);
  };
  ws.onmessage = onMessage;
  ws.onclose = () => {
    releaseAudio(s);
    if (!s.ended) setState('error', 'the connection to the bridge closed');
  };
}

function stop() {
  const s = session;
  setState('finishing', 'finishing: waiting for the last result…');
  s.source.disconnect();
  s.node.port.postMessage('flush');  // the rest of the audio, then 'end'
}

$('toggle').onclick = () => (document.body.dataset.state === 'streaming' ? stop() : start());
