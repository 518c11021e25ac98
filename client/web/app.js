// The page: microphone -> AudioWorklet (16 kHz LINEAR16) -> WebSocket -> server, and results back:
// interim text on one line, finals in a list, each with its latency. Two backends:
// * served by asr-server's WebSocket port (/api/status names a "websocket" path): the page speaks
//   Deepgram live streaming to it directly; with "auth", the API key typed into #key mints a
//   single-use token (POST /v1/auth/grant) that goes in the WebSocket subprotocols
//   (["bearer", token]), since a browser cannot set an Authorization header on a WebSocket;
// * served by the asr-web bridge: its own protocol at /ws, with the server's timing per result.
// document.body.dataset.state: idle -> starting -> streaming -> finishing -> done | error;
// document.body.dataset.backend: up | down, from /api/status on load (and the bridge's 'ready').
// Warnings (#warning): audio dropped because the WebSocket backs up by over 1 s of audio, and
// results that lag the audio by over 1 s. Every message shown is one line.
// The phrases field (one per line) and the boost go with the bridge's config, or as Deepgram's keyterm /
// keywords to the server's WebSocket port: contextual biasing.

const $ = (id) => document.getElementById(id);
const RATE = 16000;
const MAX_BUFFERED_BYTES = RATE * 2;  // 1 s of audio not yet sent: new audio is dropped, not queued
const MAX_LAG_S = 1;
const RIGHT_CONTEXT_S = 0.04;  // look-ahead the model needs beyond a result's end
let session = null;
let latencies = [];
let direct = null;  // {path, grant, auth} when the page talks to the server's WebSocket port

function oneLine(text, limit = 200) {
  const line = String(text).replace(/\s+/g, ' ').trim();
  return line.length <= limit ? line : `${line.slice(0, limit - 1)}…`;
}

// The config the page sends first: the rate, the decoding, and the phrases to favour (if any).
function streamConfig() {
  const config = {sample_rate: RATE, beam: Number($('decoding').value)};
  const phrases = $('phrases').value.split('\n').map((line) => line.trim()).filter((line) => line);
  if (phrases.length) {
    config.phrases = phrases;
    const boost = $('boost').value.trim();
    if (boost !== '' && Number(boost) !== 0) config.boost = Number(boost);
  }
  return config;
}

function setState(state, status) {
  document.body.dataset.state = state;
  $('status').textContent = oneLine(status);
  $('status').title = $('status').textContent;
  $('toggle').textContent = state === 'streaming' ? 'Stop' : 'Start';
  $('toggle').disabled = state === 'starting' || state === 'finishing';
}

function showBackend(up, text) {
  document.body.dataset.backend = up ? 'up' : 'down';
  $('backend').textContent = oneLine(text);
  $('backend').title = $('backend').textContent;
}

async function checkBackend() {
  try {
    const response = await fetch('/api/status');
    if (!response.ok) throw new Error(await response.text());
    const s = await response.json();
    direct = s.websocket ? {path: s.websocket, grant: s.grant, auth: s.auth} : null;
    $('key').hidden = !(direct && direct.auth);
    $('decoding').hidden = Boolean(direct);  // the Deepgram protocol carries no beam (phrases: keyterm / keywords)
    if (s.reachable) showBackend(true, `Server: ${s.model} (${s.precision}, ${s.device}), reachable.`);
    else showBackend(false, `Server unreachable: ${s.error}`);
  } catch (err) {
    showBackend(false, `Bridge unreachable: ${err.message}`);
  }
}

function showLevel(db) {
  $('level').value = Math.max(-60, Math.min(0, db));
  $('level').title = `microphone level: ${Number.isFinite(db) ? db.toFixed(0) : '-∞'} dBFS`;
}

function showWarnings(s) {
  const parts = [];
  const dropped = (s.dropped / RATE).toFixed(1);
  if (s.dropped) parts.push(`${dropped} s of audio dropped: the connection to the bridge is too slow`);
  if (s.lag > MAX_LAG_S) parts.push(`results lag the audio by ${s.lag.toFixed(1)} s`);
  $('warning').textContent = oneLine(parts.join(' · '), 300);
}

// How long ago the page sent the audio that result ``r`` needed: network, bridge and server
// together. ``s.marks`` holds [samples sent so far, performance.now()] after each message.
function resultLag(s, r) {
  const needed = Math.min((r.end_s + RIGHT_CONTEXT_S) * RATE, s.sent);
  let i = s.marks.findIndex(([samples]) => samples >= needed - 0.5);
  if (i < 0) i = s.marks.length - 1;
  if (i < 0) return 0;
  s.marks.splice(0, i);
  return (performance.now() - s.marks[0][1]) / 1000;
}

function percentile(values, q) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

function showTiming(r) {
  latencies.push(r.latency_ms);
  if (r.queue_wait_ms === undefined) {  // direct: the page's own measure (the protocol has no server timing)
    $('stats').textContent =
      `last result: ${r.latency_ms.toFixed(0)} ms after its audio was sent · over ${latencies.length} ` +
      `results: p50 ${percentile(latencies, 0.5).toFixed(0)} ms, max ${Math.max(...latencies).toFixed(0)} ms · ` +
      `${(session ? session.sent / RATE : 0).toFixed(1)} s of audio sent`;
    return;
  }
  const bridge = r.bridge_latency_ms === null ? '' : ` · via the bridge ${r.bridge_latency_ms.toFixed(0)} ms`;
  $('stats').textContent =
    `last result: server ${r.latency_ms.toFixed(0)} ms (queue ${r.queue_wait_ms.toFixed(0)} ms, ` +
    `compute ${r.compute_ms.toFixed(0)} ms, batch of ${r.batch_size})${bridge} · ` +
    `server latency over ${latencies.length} results: p50 ${percentile(latencies, 0.5).toFixed(0)} ms, ` +
    `max ${Math.max(...latencies).toFixed(0)} ms · ${(session ? session.sent / RATE : 0).toFixed(1)} s of audio sent`;
}

function onResult(r) {
  session.lag = resultLag(session, r);
  if (r.latency_ms === undefined) r.latency_ms = session.lag * 1000;
  showTiming(r);
  showWarnings(session);
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
  latency.title = r.queue_wait_ms === undefined ? 'from sending its audio to the result'
    : `queue ${r.queue_wait_ms} ms, compute ${r.compute_ms} ms, batch of ${r.batch_size}`;
  li.append(text, latency);
  $('finals').append(li);
}

function onMessage(event) {
  let msg;
  try {
    msg = JSON.parse(event.data);
  } catch (err) {
    msg = {type: 'error', code: 'INTERNAL', message: 'the bridge sent a message that is not JSON'};
  }
  if (msg.type === 'ready') {
    if (document.body.dataset.backend !== 'up') showBackend(true, `Server: ${msg.model}, reachable.`);
    setState('streaming', 'listening…');
  } else if (msg.type === 'result') {
    onResult(msg);
  } else if (msg.type === 'end') {
    session.ended = true;
    setState('done', 'done');
  } else if (msg.type === 'error') {
    session.ended = true;
    setState('error', `error: ${msg.code}: ${msg.message}`);
    if (msg.code === 'UNAVAILABLE') checkBackend();
  }
}

// A Deepgram message from the server's WebSocket port, as the bridge's messages are handled.
function onDeepgramMessage(event) {
  let msg;
  try {
    msg = JSON.parse(event.data);
  } catch (err) {
    msg = {type: 'Error', description: 'the server sent a message that is not JSON'};
  }
  if (msg.type === 'Results') {
    const alt = msg.channel.alternatives[0];
    onResult({transcript: alt.transcript, is_final: msg.is_final, start_s: msg.start,
              end_s: msg.start + msg.duration});
  } else if (msg.type === 'Metadata') {
    session.ended = true;
    setState('done', 'done');
  } else if (msg.type === 'Error') {
    session.ended = true;
    setState('error', `error: ${msg.code || msg.variant}: ${msg.description}`);
  }
}

// The token a browser may put in the WebSocket subprotocols: minted with the typed API key.
async function grantToken() {
  const key = $('key').value.trim();
  if (!key) throw new Error('this server needs an API key: type it into the key field');
  const response = await fetch(direct.grant, {method: 'POST', body: '{}',
    headers: {'Authorization': `Token ${key}`, 'Content-Type': 'application/json'}});
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.err_msg || body.error || `HTTP ${response.status}`);
  return body.access_token;
}

function openSocket(token) {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  if (!direct) return new WebSocket(`${scheme}://${location.host}/ws`);
  let query = `encoding=linear16&sample_rate=${RATE}&interim_results=true`;
  // the phrases as Deepgram's keywords (PHRASE:BOOST), or keyterm without a boost (the server's default)
  const config = streamConfig();
  for (const phrase of config.phrases || []) {
    query += config.boost ? `&keywords=${encodeURIComponent(`${phrase}:${config.boost}`)}`
      : `&keyterm=${encodeURIComponent(phrase)}`;
  }
  const url = `${scheme}://${location.host}${direct.path}?${query}`;
  return token ? new WebSocket(url, ['bearer', token]) : new WebSocket(url);
}

function releaseAudio(s) {
  s.media.getTracks().forEach((t) => t.stop());
  s.context.close();
  showLevel(-Infinity);
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
  $('warning').textContent = '';
  let token = null;
  if (direct && direct.auth) {
    try {
      token = await grantToken();
    } catch (err) {
      setState('error', `no token: ${err.message}`);
      return;
    }
  }
  let audio;
  try {
    audio = await openAudio();
  } catch (err) {
    setState('error', `no microphone: ${err.name}: ${err.message}`);
    return;
  }
  const ws = openSocket(token);
  session = {...audio, ws, sent: 0, dropped: 0, lag: 0, marks: [], ended: false};
  const s = session;
  ws.onopen = () => {
    if (direct) setState('streaming', 'listening…');
    else ws.send(JSON.stringify(streamConfig()));
    s.node.port.onmessage = (event) => {
      if (event.data === 'flushed') {
        if (ws.readyState === WebSocket.OPEN) ws.send(direct ? JSON.stringify({type: 'CloseStream'}) : 'end');
        return;
      }
      showLevel(event.data.level);
      if (ws.readyState !== WebSocket.OPEN) return;
      const samples = event.data.pcm.byteLength / 2;
      if (ws.bufferedAmount > MAX_BUFFERED_BYTES) {
        s.dropped += samples;
        showWarnings(s);
        return;
      }
      ws.send(event.data.pcm);
      s.sent += samples;
      s.marks.push([s.sent, performance.now()]);
    };
    s.source.connect(s.node);
  };
  ws.onmessage = direct ? onDeepgramMessage : onMessage;
  ws.onclose = (event) => {
    releaseAudio(s);
    if (s.ended) return;
    const peer = direct ? 'server' : 'bridge';
    setState('error', event.code === 1009 ? `the ${peer} refused a message that was too big`
      : `the connection to the ${peer} closed (code ${event.code}${event.reason ? `: ${event.reason}` : ''})`);
    checkBackend();  // says why when the bridge refused the page or the server is down
  };
}

function stop() {
  const s = session;
  setState('finishing', 'finishing: waiting for the last result…');
  s.source.disconnect();
  s.node.port.postMessage('flush');  // the rest of the audio, then 'end'
}

$('toggle').onclick = () => (document.body.dataset.state === 'streaming' ? stop() : start());
checkBackend();
