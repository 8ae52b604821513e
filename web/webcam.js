// Block Cascade webcam: the browser's camera as a running Video-to-Video node's live video input.
// Frames are drawn to a canvas at the run's size and POSTed as JPEG to the pack's route (nodes/live_input.py:
// POST /block_cascade/webcam/{node}?run=RUN), at most `fps` a second and never more than one request in flight.
// No ComfyUI imports: player_view.js puts the button beside the steer box, and `node --test` drives it with fakes.

/** The route that takes a running sampler's webcam frames (nodes/live_input.py). */
export const WEBCAM_ROUTE = "/block_cascade/webcam";
/** Frames posted a second at most (the model's output rate: it keeps the newest and drops older ones). */
export const WEBCAM_FPS = 16;
export const JPEG_QUALITY = 0.85;

const firstLine = (x) => String(x).split("\n")[0];

/** The path a frame of run `run` of sampler `node` is posted to. */
export function webcamPath(node, run) {
  return `${WEBCAM_ROUTE}/${encodeURIComponent(String(node))}?run=${encodeURIComponent(String(run))}`;
}

/** The part of a `sw` x `sh` camera picture that covers a `w` x `h` canvas, centred: [sx, sy, sWidth, sHeight]. */
export function coverCrop(sw, sh, w, h) {
  if (sw * h > sh * w) {
    const cw = (sh * w) / h;
    return [(sw - cw) / 2, 0, cw, sh];
  }
  const ch = (sw * h) / w;
  return [0, (sh - ch) / 2, sw, ch];
}

/**
 * Sends camera frames to one run of a sampler. Everything the browser gives is injected (tests pass fakes):
 * `post(path, init)` fetch-like (resolves to {status, json()}), `getUserMedia(constraints)` (resolves to a
 * MediaStream: getTracks()), `makeVideo()` a <video>, `makeCanvas(w, h)` a <canvas> (getContext("2d"), toBlob),
 * `now()` ms, `schedule(fn, ms)` / `cancel(handle)` timers, `onChange()` told when state, error or counts change.
 * `state`: "off" | "starting" | "on"; `error`: "" or one line saying why it stopped; `sent`: frames taken by
 * the server; `dropped`: frames the server dropped unseen (the run is slower than the camera).
 */
export class WebcamSender {
  constructor({ post, getUserMedia, makeVideo, makeCanvas, fps = WEBCAM_FPS, now = () => performance.now(),
                schedule = (fn, ms) => setTimeout(fn, ms), cancel = (h) => clearTimeout(h), onChange = () => {} }) {
    Object.assign(this, { post, getUserMedia, makeVideo, makeCanvas, fps, now, schedule, cancel, onChange });
    this.state = "off";
    this.error = "";
    this.node = this.run = null;
    this.sent = this.dropped = 0;
    this.inFlight = false;
    this._session = 0; // bumped by start and stop: an older session's callbacks do nothing
    this._media = this._video = this._canvas = this._timer = null;
    this._lastAt = -Infinity;
  }

  /** Ask for the camera and post its frames for run `run` of sampler `node`, drawn at `width` x `height`
   * (the server's answer gives the run's size; the canvas follows it). Resolves when started or refused. */
  async start(node, run, width, height) {
    if (this.state !== "off") return;
    const session = ++this._session;
    Object.assign(this, { state: "starting", error: "", node: String(node), run: String(run), sent: 0, dropped: 0 });
    this.onChange();
    let media;
    try {
      media = await this.getUserMedia({ video: { width: { ideal: width }, height: { ideal: height } }, audio: false });
    } catch (e) {
      if (session === this._session) this.stop(`webcam: ${firstLine((e && (e.message || e.name)) || e)}`);
      return;
    }
    if (session !== this._session) { // stopped while the browser asked
      for (const t of media.getTracks()) t.stop();
      return;
    }
    this._media = media;
    const video = (this._video = this.makeVideo());
    Object.assign(video, { muted: true, playsInline: true, srcObject: media });
    try {
      await video.play();
    } catch (e) {
      if (session === this._session) this.stop(`webcam: ${firstLine((e && (e.message || e.name)) || e)}`);
      return;
    }
    if (session !== this._session) return;
    this._canvas = this.makeCanvas(Math.max(1, width | 0), Math.max(1, height | 0));
    this.state = "on";
    this.onChange();
    this._tick(session);
  }

  /** Stop posting and stop the camera's tracks (the browser's camera light goes off); `error`: why, or "". */
  stop(error = "") {
    this._session++;
    if (this._media) for (const t of this._media.getTracks()) t.stop();
    if (this._video) {
      if (this._video.pause) this._video.pause();
      this._video.srcObject = null;
    }
    if (this._timer !== null) this.cancel(this._timer);
    this._media = this._video = this._canvas = this._timer = null;
    const changed = this.state !== "off" || this.error !== error;
    this.state = "off";
    this.error = error;
    this.inFlight = false;
    if (changed) this.onChange();
  }

  _later(session, ms) {
    this._timer = this.schedule(() => {
      this._timer = null;
      this._tick(session);
    }, Math.max(0, ms));
  }

  _tick(session) {
    if (session !== this._session || this.state !== "on" || this.inFlight) return;
    const interval = 1000 / this.fps, wait = this._lastAt + interval - this.now();
    if (wait > 0) return this._later(session, wait);
    const video = this._video, canvas = this._canvas;
    if (!video.videoWidth || !video.videoHeight) return this._later(session, interval); // no picture yet
    canvas.getContext("2d").drawImage(video, ...coverCrop(video.videoWidth, video.videoHeight, canvas.width, canvas.height),
      0, 0, canvas.width, canvas.height);
    this.inFlight = true;
    this._lastAt = this.now();
    canvas.toBlob((blob) => this._send(session, blob), "image/jpeg", JPEG_QUALITY);
  }

  async _send(session, blob) {
    if (session !== this._session) return;
    if (!blob) {
      this.inFlight = false;
      return this._later(session, 1000 / this.fps);
    }
    let res, answer = null;
    try {
      res = await this.post(webcamPath(this.node, this.run), { method: "POST", headers: { "Content-Type": "image/jpeg" },
        body: blob });
      answer = await res.json();
    } catch (e) {
      if (session !== this._session) return;
      if (!res) return this.stop(`webcam: not sent: ${firstLine((e && e.message) || e)}`);
    }
    if (session !== this._session) return; // stopped while the frame was on its way
    this.inFlight = false;
    if (res.status === 200) {
      this.sent++;
      if (answer && Number.isInteger(answer.dropped)) this.dropped = answer.dropped;
      const w = answer && answer.width, h = answer && answer.height;
      if (Number.isInteger(w) && Number.isInteger(h) && w > 0 && h > 0 && (w !== this._canvas.width || h !== this._canvas.height)) {
        this._canvas.width = w; // the run's size: the server resizes nothing from now on
        this._canvas.height = h;
      }
      this.onChange();
    } else if (res.status !== 429) { // 429: frames still being decoded; the next one waits an interval
      const why = answer && typeof answer.error === "string" ? firstLine(answer.error) : `refused: HTTP ${res.status}`;
      return this.stop(`webcam: ${why}`);
    }
    this._tick(session);
  }
}

/** Whether run `s` (a player_core Stream) reads the browser's webcam: running, its start said live_input "webcam". */
export function readsWebcam(s) {
  return !!s && s.status === "running" && s.liveInput === "webcam";
}

/**
 * A "webcam" button for the player (player_view.js), shown only while the run shown reads the webcam
 * (readsWebcam: a Video-to-Video node with live "webcam"): it starts the camera for that run, and stops it when
 * pressed again, when the run ends (Cancel, done, an error) or when another run is shown. `post` is
 * fetch-like; `mediaDevices` the browser's (navigator.mediaDevices); a page without one (http:// other than
 * localhost: browsers give cameras to secure pages only) gets a disabled button saying so.
 * Returns {element, update(stream), sender}; call update(stream) every animation frame.
 */
export function createWebcamButton(doc, { post, mediaDevices = doc.defaultView?.navigator?.mediaDevices, ...rest } = {}) {
  const element = doc.createElement("span");
  element.className = "bc-webcam";
  const button = doc.createElement("button");
  const note = doc.createElement("span");
  note.className = "bc-webcam-note";
  element.append(button, " ", note);
  const canUse = !!(mediaDevices && mediaDevices.getUserMedia);
  let shown = null, text = null;
  const sender = new WebcamSender({
    post,
    getUserMedia: (c) => mediaDevices.getUserMedia(c),
    makeVideo: () => doc.createElement("video"),
    makeCanvas: (w, h) => Object.assign(doc.createElement("canvas"), { width: w, height: h }),
    onChange: () => render(),
    ...rest,
  });
  function render() {
    const label = { off: "webcam", starting: "webcam …", on: "■ stop webcam" }[sender.state];
    const line = sender.error || (sender.state === "on" ? `${sender.sent} sent${sender.dropped ? `, ${sender.dropped} dropped` : ""}` : "");
    if (label + line === text) return;
    text = label + line;
    button.textContent = label;
    note.textContent = note.title = line;
  }
  button.disabled = !canUse;
  button.title = canUse ? "send this browser's camera to the running sampler as its video input"
    : "no camera here: browsers give cameras to https:// pages and http://localhost only";
  button.onclick = () => {
    if (sender.state !== "off") return sender.stop();
    if (canUse && readsWebcam(shown)) sender.start(shown.node, shown.run, shown.width || 320, shown.height || 180);
  };
  function update(s) {
    shown = s;
    const same = readsWebcam(s) && String(s.node) === sender.node && String(s.run) === sender.run;
    if (sender.state !== "off" && !same) sender.stop(); // Cancel, the end of the run, another run: the camera goes off
    const display = readsWebcam(s) ? "" : "none"; // a run of another input has no use for a camera
    if (element.style && element.style.display !== display) element.style.display = display;
    render();
  }
  render();
  return { element, update, sender };
}
