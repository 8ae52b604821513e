// Block Cascade player: the DOM part (canvas, stats, cascade grid, controls, the timeline of steered
// switches, the steer box and the switches list). No ComfyUI imports: the node widget (block_cascade.js) and the test harness
// (tests/web/fixtures) both build it from here.
import { describe } from "./player_describe.js";
import { createWebcamButton } from "./webcam.js";

const CSS = `
.bc-player { display: flex; flex-direction: column; gap: 4px; font: 12px sans-serif; color: #ccc; width: 100%; height: 100%; box-sizing: border-box; overflow: hidden; }
.bc-player .bc-status, .bc-player .bc-stats, .bc-player .bc-cascade, .bc-player .bc-settings, .bc-player .bc-video { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; flex: none; }
.bc-player canvas { width: 100%; flex: 1 1 auto; min-height: 120px; object-fit: contain; background: #111; border-radius: 4px; }
.bc-player .bc-status { color: #eee; font-size: 14px; }
.bc-player .bc-settings { color: #aaa; }
.bc-player .bc-mjpeg, .bc-player .bc-video { color: #8cf; }
.bc-player .bc-grid { display: flex; flex-direction: column; gap: 2px; }
.bc-player .bc-row { display: flex; align-items: center; gap: 2px; }
.bc-player .bc-row span { width: 3.5em; }
.bc-player .bc-cell { width: 10px; height: 8px; background: #555; border-radius: 1px; }
.bc-player .bc-cell.on { background: #4a8; }
.bc-player .bc-cell.clean { background: #8cf; }
.bc-player .bc-controls { display: flex; gap: 6px; align-items: center; }
.bc-player .bc-controls input { flex: 1; }
.bc-player .bc-switches div, .bc-player .bc-steer-error { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.bc-player .bc-switches .dropped { color: #777; }
.bc-player .bc-timeline { position: relative; height: 8px; background: #4a4a4a; border-radius: 2px; }
.bc-player .bc-tick { position: absolute; top: 0; width: 3px; height: 100%; margin-left: -1px; background: #fc6; }
.bc-player .bc-steer-row { display: flex; gap: 4px; }
.bc-player .bc-steer-row input { min-width: 0; box-sizing: border-box; }
.bc-player .bc-steer-text { flex: 1; }
.bc-player .bc-steer-block, .bc-player .bc-steer-blend { width: 6em; }
.bc-player .bc-steer-error { color: #e88; }
`;

/** The path of a running sampler's MJPEG stream (nodes/mjpeg.py), for players outside ComfyUI. */
export function mjpegPath(node) {
  return `/block_cascade/stream/${encodeURIComponent(String(node))}.mjpeg`;
}

/** The path ComfyUI serves a saved file at (`video`: {filename, subfolder, type} from the done event). */
export function videoPath(video) {
  const { filename, subfolder = "", type = "output" } = video;
  return `/view?${new URLSearchParams({ filename, subfolder, type })}`;
}

/** The server route that takes steered prompts (nodes/steer.py). */
export const STEER_ROUTE = "/block_cascade/steer";

const firstLine = (x) => String(x).split("\n")[0];

/** The most blocks a switch blends over (the route's bound, cascade_core/sampling/blend.py). */
export const MAX_BLEND = 64;

/**
 * Send `text` to the running sampler `node` through `post(path, init)`, a fetch-like function (resolves
 * to a Response: `status`, `json()`): POST STEER_ROUTE with the JSON body {node, text}, plus `block` when
 * `block` is given (a whole number >= 0, or a string of one: the block to switch at; null, undefined or
 * a blank string: the next block to enter), plus `blend_blocks` when `blend` is a whole number 1..MAX_BLEND
 * (or a string of one: the blocks to blend the old and new prompts over; blank or 0: a hard switch).
 * Resolves to null when nothing was sent (a blank text), "" when the server queued it (200), else one line
 * saying why not (a bad block or blend, which is not sent; the server's "error", or the HTTP status, or the
 * failed request). Never rejects.
 */
export async function steer(post, node, text, block = null, blend = null) {
  if (typeof text !== "string" || !text.trim()) return null;
  const body = { node: String(node), text };
  const given = (v) => v !== null && v !== undefined && String(v).trim() !== "";
  if (given(block)) {
    const b = Number(String(block).trim());
    if (!Number.isInteger(b) || b < 0) return `not sent: "at block" must be a whole number >= 0, got ${firstLine(block)}`;
    body.block = b;
  }
  if (given(blend)) {
    const n = Number(String(blend).trim());
    if (!Number.isInteger(n) || n < 0 || n > MAX_BLEND) return `not sent: "blend" must be a whole number 0..${MAX_BLEND}, got ${firstLine(blend)}`;
    if (n) body.blend_blocks = n;
  }
  let res;
  try {
    res = await post(STEER_ROUTE, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (e) {
    return `not sent: ${firstLine((e && e.message) || e)}`;
  }
  if (res.status === 200) return "";
  let answer = null;
  try {
    answer = await res.json();
  } catch {
    // not JSON (an older server without the route): the status says enough
  }
  return answer && typeof answer.error === "string" ? firstLine(answer.error) : `refused: HTTP ${res.status}`;
}

/** Draw `img` into the canvas, letterboxed to keep its aspect ratio. */
export function drawFit(ctx, img) {
  const { width: W, height: H } = ctx.canvas;
  const iw = img.naturalWidth || img.width, ih = img.naturalHeight || img.height;
  if (!iw || !ih) return;
  const k = Math.min(W / iw, H / ih);
  const w = Math.round(iw * k), h = Math.round(ih * k);
  ctx.fillStyle = "#111";
  ctx.fillRect(0, 0, W, H);
  ctx.drawImage(img, Math.floor((W - w) / 2), Math.floor((H - h) / 2), w, h);
}

function el(doc, tag, cls, parent) {
  const e = doc.createElement(tag);
  if (cls) e.className = cls;
  if (parent) parent.appendChild(e);
  return e;
}

/**
 * Build a player bound to `getStream()` (returns the node's current Stream or null) and `getNote()`
 * (the node's Hub.note: what it waits for, or null).
 * Call `update(nowMs)` every animation frame; `onDraw(index, shownAt)` is told each frame drawn.
 * With `post` (fetch-like, see steer()) a running stream shows a text box and an optional "at block"
 * number: Enter steers it. A running stream shows a link to its MJPEG stream at `url(mjpegPath(node))`
 * (`url`: the server's URL of a path), a finished one the video it saved at `url(videoPath(video))`.
 */
export function createPlayerView(doc, getStream, { onDraw = null, prefetch = 4, getNote = () => null, post = null,
                                                   url = (path) => path } = {}) {
  if (!doc.getElementById("bc-player-style")) {
    const style = el(doc, "style", null, doc.head);
    style.id = "bc-player-style";
    style.textContent = CSS;
  }
  const root = el(doc, "div", "bc-player");
  const canvas = el(doc, "canvas", null, root);
  canvas.width = 320;
  canvas.height = 180;
  const ctx = canvas.getContext("2d");
  const status = el(doc, "div", "bc-status", root);
  const stats = el(doc, "div", "bc-stats", root);
  const cascadeLine = el(doc, "div", "bc-cascade", root);
  const settingsLine = el(doc, "div", "bc-settings", root);
  const live = el(doc, "a", "bc-mjpeg", root);
  live.target = "_blank";
  live.textContent = "MJPEG stream (OBS, a browser)";
  const saved = el(doc, "a", "bc-video", root);
  saved.target = "_blank";
  const grid = el(doc, "div", "bc-grid", root);
  const controls = el(doc, "div", "bc-controls", root);
  const button = el(doc, "button", null, controls);
  const slider = el(doc, "input", null, controls);
  const position = el(doc, "span", null, controls);
  slider.type = "range";
  const timeline = el(doc, "div", "bc-timeline", root);
  const switchList = el(doc, "div", "bc-switches", root);
  const steerBox = el(doc, "div", "bc-steer", root);
  const steerRow = el(doc, "div", "bc-steer-row", steerBox);
  const steerInput = el(doc, "input", "bc-steer-text", steerRow);
  const blockInput = el(doc, "input", "bc-steer-block", steerRow);
  const blendInput = el(doc, "input", "bc-steer-blend", steerRow);
  const steerError = el(doc, "div", "bc-steer-error", steerBox);
  const webcam = post ? createWebcamButton(doc, { post }) : null; // the camera as the run's video input (webcam.js)
  if (webcam) steerBox.insertBefore(webcam.element, steerError);
  steerInput.type = "text";
  steerInput.placeholder = "steer: type a prompt, Enter";
  blockInput.type = "number";
  blockInput.min = "0";
  blockInput.step = "1";
  blockInput.placeholder = "at block";
  blockInput.title = "the block to switch at (empty: the next block to enter)";
  Object.assign(blendInput, { type: "number", min: "0", max: String(MAX_BLEND), step: "1", placeholder: "blend",
    title: "blocks to blend the old prompt into the new one over (empty or 0: at once; Krea's demo: 4)" });
  // keep canvas clicks from dragging the node, and typing from reaching the graph's shortcuts
  for (const e of ["pointerdown", "mousedown", "wheel"]) controls.addEventListener(e, (ev) => ev.stopPropagation());
  for (const e of ["pointerdown", "mousedown", "wheel", "keydown", "keyup"]) steerBox.addEventListener(e, (ev) => ev.stopPropagation());

  let stream = null, version = -1, noted = null, drawn = -1, images = new Map(), sending = false;
  button.onclick = () => stream && stream.toggle();
  steerBox.addEventListener("keydown", (ev) => {
    if (ev.key !== "Enter" || sending || !stream || !stream.steerable || !post) return;
    const s = stream, text = steerInput.value, block = blockInput.value, blend = blendInput.value;
    sending = true;
    steer(post, s.node, text, block, blend).then((error) => {
      sending = false;
      if (stream !== s || error === null) return; // another run by now, or nothing sent
      // the blend is kept: the next prompt typed likely wants the same transition
      if (error === "" && steerInput.value === text && blockInput.value === block) steerInput.value = blockInput.value = "";
      steerError.textContent = error;
    });
  });
  slider.oninput = () => {
    if (!stream) return;
    stream.pause();
    stream.seek(Number(slider.value));
  };

  // decoded <img> per frame index, kept for the frames around the playhead only
  function image(i) {
    let img = images.get(i);
    const jpeg = stream ? stream.frame(i) : undefined;
    if (!img && jpeg !== undefined) {
      img = new (doc.defaultView.Image)();
      img.src = "data:image/jpeg;base64," + jpeg;
      images.set(i, img);
    }
    return img || null;
  }

  function draw(i) {
    const img = image(i);
    for (let k = 1; k <= prefetch; k++) image(i + k);
    for (const key of images.keys()) if (key < i - 1 || key > i + prefetch) images.delete(key);
    if (!img) return;
    const paint = () => {
      if (stream && stream.shown === i) {
        drawFit(ctx, img);
        drawn = i;
        if (onDraw) onDraw(i, stream.shownAt);
      }
    };
    if (img.complete && img.naturalWidth) paint();
    else img.onload = paint;
  }

  function reset(s) {
    stream = s;
    images = new Map();
    drawn = -1;
    version = -1;
    if (s && s.width && s.height) {
      canvas.width = s.width;
      canvas.height = s.height;
    }
    ctx.fillStyle = "#111";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    steerError.textContent = "";
  }

  function renderGrid(s) {
    grid.replaceChildren();
    for (const { block, stage, clean } of s ? s.cascade : []) {
      const row = el(doc, "div", "bc-row", grid);
      el(doc, "span", null, row).textContent = `B${block}`;
      const steps = s.cleanPass ? s.stages - 1 : s.stages;
      for (let k = 0; k < s.stages; k++) {
        const cell = el(doc, "div", "bc-cell", row);
        if (k <= stage) cell.classList.add(k >= steps ? "clean" : "on");
      }
      el(doc, "span", null, row).textContent = clean ? "clean" : `${stage + 1}/${steps}`;
    }
  }

  function update(now) {
    const s = getStream();
    if (s !== stream) reset(s);
    if (webcam) webcam.update(s);
    if (s) {
      s.tick(now);
      if (s.shown >= 0 && s.shown !== drawn) draw(s.shown);
    }
    const note = getNote();
    if (s && s.version === version && note === noted) return;
    version = s ? s.version : -1;
    noted = note;
    const d = describe(s, note);
    // one line each (never wider than the node), the whole text on hover
    status.textContent = status.title = d.status;
    stats.textContent = d.stats;
    stats.title = d.details;
    cascadeLine.textContent = cascadeLine.title = d.cascade;
    settingsLine.textContent = d.settings ? `settings: ${d.settings}` : "";
    settingsLine.title = d.settings;
    renderGrid(s);
    switchList.replaceChildren();
    for (const line of d.switches) {
      const row = el(doc, "div", line.dropped ? "dropped" : null, switchList);
      row.textContent = row.title = line.text;
    }
    timeline.replaceChildren();
    for (const { pos, text } of d.ticks) {
      const mark = el(doc, "div", "bc-tick", timeline);
      mark.style.left = `${(100 * pos).toFixed(3)}%`;
      mark.title = text;
    }
    timeline.style.display = d.ticks.length ? "" : "none";
    steerBox.style.display = post && s && s.status === "running" ? "" : "none";
    const canSteer = !s || s.steerable;
    steerInput.disabled = blockInput.disabled = blendInput.disabled = !canSteer;
    steerInput.placeholder = canSteer ? "steer: type a prompt, Enter"
      : "to steer, connect a CLIP (CLIPLoader, type wan) to the sampler's clip input";
    live.style.display = s && s.status === "running" ? "" : "none";
    if (s) live.href = url(mjpegPath(s.node));
    saved.style.display = s && s.video ? "" : "none";
    if (s && s.video) {
      saved.href = url(videoPath(s.video));
      saved.textContent = saved.title = `saved video: ${s.video.filename}`;
    }
    const n = s ? s.frames.size : 0;
    controls.style.display = n ? "" : "none";
    button.textContent = s && s.playing ? "❚❚" : "▶";
    slider.min = String(n ? s.oldest : 0);
    slider.max = String(n ? s.lastIndex : 0);
    slider.value = String(Math.max(n ? s.oldest : 0, s ? s.shown : 0));
    position.textContent = n ? `${s.shown + 1}/${s.lastIndex + 1}` : "";
  }

  update(0);
  return { element: root, canvas, update, get drawn() { return drawn; } };
}
