// Block Cascade player: pure bookkeeping (no DOM, no ComfyUI), so `node --test` can exercise it.
//
// Events (websocket, JSON; `detail` is the event's data; META = node, run, blocks, frames_total, fps,
// width, height, stages, parallel, clean_pass, repeated in state and frames so a page reloaded mid-run joins):
//   block_cascade.start  {META}
//   block_cascade.state  {META, tick, ticks, pairs: [[block, stage], ...], done_blocks, elapsed}
//   block_cascade.frames {META, block, first_frame, frames: [base64 JPEG, ...], elapsed}
//     (block -1: the frames of a context before block 0, a start image or the video continued)
//   block_cascade.done   {node, run, seconds, frames, blocks, error?}
//   block_cascade.switch {node, run, block, text, dropped?}: a steered prompt landed at `block` (block
//     null and `dropped` saying why when it could not land)
// A Hub keeps one Stream per sampler node id; a Stream holds one run's frames, stats, cascade state
// and the playback clock (frames are shown at the video's fps, never faster). The Hub also follows
// ComfyUI's own execution events (Hub.comfy) to say what a sampler waits for, or that its outputs
// came from the cache.

export const EVENT_PREFIX = "block_cascade.";
export const EVENTS = ["start", "state", "frames", "done", "switch"].map((k) => EVENT_PREFIX + k);
/** ComfyUI's own websocket events that Hub.comfy follows. */
export const COMFY_EVENTS = ["execution_start", "executing", "execution_cached", "execution_success",
  "execution_error", "execution_interrupted"];

/** The most steered-prompt switches a Stream keeps (the latest ones), and the most describe() lists. */
export const SWITCHES_KEPT = 100;
export const SWITCHES_SHOWN = 4;

const num = (v, fallback) => (Number.isFinite(Number(v)) && Number(v) > 0 ? Number(v) : fallback);

export class Stream {
  constructor(start) {
    this.node = String(start.node);
    this.run = String(start.run);
    this.blocks = num(start.blocks, 0);
    this.framesTotal = num(start.frames_total, 0);
    this.fps = num(start.fps, 16);
    this.width = num(start.width, 0);
    this.height = num(start.height, 0);
    this.stages = num(start.stages, 1);
    this.cleanPass = start.clean_pass !== false; // the last stage is a clean pass (not with Krea's KV recompute)
    this.parallel = num(start.parallel, 1);
    this.settings = typeof start.settings === "string" ? start.settings : ""; // the run's effective sampling settings
    this.frames = []; // base64 JPEG by frame index (sparse until every block arrived)
    this.received = 0; // distinct frames received
    this.elapsed = 0; // seconds since run start, latest the backend told us
    this.firstFrameAt = null; // seconds from run start to the first frames message
    this.state = null; // {tick, ticks, pairs, doneBlocks}
    this.switches = []; // steered prompts of this run, oldest first: [{block (null: dropped), text, dropped}]
    this.switchCount = 0; // switches told so far (the list keeps the last SWITCHES_KEPT)
    this.status = "running"; // running | done | error
    this.joined = false; // picked up mid-run (page reloaded): frames before the join are missing
    this.cached = false; // ComfyUI answered a later prompt from the cache: these are that run's frames
    this.error = null;
    this.seconds = null;
    // playback
    this.playing = true;
    this.shown = -1; // frame index on screen
    this.shownAt = null; // clock time (ms) tick() put it there
    this.playhead = 0; // next frame index to show
    this.nextDue = null; // ms timestamp before which the next frame may not be shown
    this.version = 0; // bumped on any change the view should re-render
  }

  get interval() {
    return 1000 / this.fps;
  }

  onState(d) {
    this.state = {
      tick: Number(d.tick) || 0,
      ticks: Number(d.ticks) || 0,
      pairs: Array.isArray(d.pairs) ? d.pairs.map(([b, s]) => [Number(b), Number(s)]) : [],
      doneBlocks: Number(d.done_blocks) || 0,
    };
    this._seen(d.elapsed);
    this.version++;
  }

  onFrames(d) {
    const first = Number(d.first_frame) || 0;
    const list = Array.isArray(d.frames) ? d.frames : [];
    if (this.joined && this.received === 0 && list.length) this.playhead = first; // play from the join
    list.forEach((f, i) => {
      if (typeof f !== "string" || !f) return;
      if (this.frames[first + i] === undefined) this.received++;
      this.frames[first + i] = f;
    });
    if (list.length && this.firstFrameAt === null) this.firstFrameAt = Number(d.elapsed) || 0;
    this._seen(d.elapsed);
    this.version++;
  }

  onDone(d) {
    this.status = d.error ? "error" : "done";
    this.error = d.error ? String(d.error) : null;
    this.seconds = Number.isFinite(Number(d.seconds)) ? Number(d.seconds) : this.elapsed;
    if (this.state) {
      this.state = { ...this.state, pairs: [] };
      if (!d.error) Object.assign(this.state, { tick: this.state.ticks, doneBlocks: this.blocks });
      else if (Number.isFinite(Number(d.blocks))) this.state.doneBlocks = Number(d.blocks); // = frames shown
    }
    this.version++;
  }

  /** A steered prompt landed at `d.block`, or (`d.dropped`: why) could not land. */
  onSwitch(d) {
    const block = Number.isInteger(d.block) && !d.dropped ? d.block : null;
    this.switches.push({ block, text: String(d.text ?? ""), dropped: d.dropped ? String(d.dropped) : "" });
    if (this.switches.length > SWITCHES_KEPT) this.switches.splice(0, this.switches.length - SWITCHES_KEPT);
    this.switchCount++;
    this.version++;
  }

  _seen(elapsed) {
    const e = Number(elapsed);
    if (Number.isFinite(e) && e > this.elapsed) this.elapsed = e;
  }

  /** Frames received per second of generation time (0 until known). */
  get genFps() {
    return this.elapsed > 0 ? this.received / this.elapsed : 0;
  }

  get lastIndex() {
    return this.frames.length - 1;
  }

  /** Frames ready to play after the one on screen (contiguous). */
  get buffered() {
    let n = 0;
    while (this.frames[this.playhead + n] !== undefined) n++;
    return n;
  }

  /** In-flight blocks as [{block, stage, clean}] (stage 0..stages-2 = step, stages-1 = clean pass; without
   * clean passes every stage is a step). */
  get cascade() {
    if (!this.state) return [];
    return this.state.pairs.map(([block, stage]) => ({ block, stage, clean: this.cleanPass && stage >= this.stages - 1 }));
  }

  /**
   * Advance the playback clock to `now` (ms). Returns true when `shown` changed.
   * Frames are shown in index order, one per interval at most; when the next frame is not there yet
   * the clock waits and shows it as soon as it arrives. A finished run stops at its last frame.
   */
  tick(now) {
    if (!this.playing) return false;
    if (this.nextDue !== null && now < this.nextDue) return false;
    if (this.status !== "running") {
      // finished: skip frames that never came, stop after the last one
      while (this.playhead <= this.lastIndex && this.frames[this.playhead] === undefined) this.playhead++;
      if (this.playhead > this.lastIndex) {
        this.playing = false;
        this.version++;
        return false;
      }
    }
    if (this.frames[this.playhead] === undefined) return false; // waiting for the generator
    this.shown = this.playhead++;
    this.shownAt = now;
    // keep a steady cadence, but after a stall restart from now instead of catching up in a burst
    const late = this.nextDue === null || now - this.nextDue > this.interval;
    this.nextDue = (late ? now : this.nextDue) + this.interval;
    this.version++;
    return true;
  }

  /** Show frame `i` now (clamped); playback continues from the next one. */
  seek(i) {
    if (this.frames.length === 0) return;
    this.shown = Math.max(0, Math.min(this.lastIndex, Math.round(Number(i) || 0)));
    this.playhead = this.shown + 1;
    this.shownAt = null;
    this.nextDue = null;
    this.version++;
  }

  play() {
    if (this.status !== "running" && this.playhead > this.lastIndex) {
      this.playhead = 0; // replay from the start
    }
    this.playing = true;
    this.nextDue = null;
    this.version++;
  }

  pause() {
    this.playing = false;
    this.version++;
  }

  toggle() {
    if (this.playing) this.pause();
    else this.play();
  }
}

/** Routes events to per-node Streams. `accept(nodeId)` says whether a node id is one of ours. */
export class Hub {
  constructor({ accept = () => true } = {}) {
    this.accept = accept;
    this.streams = new Map();
    this.notes = new Map(); // node id -> what the node waits for while it has no running stream
    this.pending = new Set(); // sampler ids of the prompt being run that have not started yet
    this.seen = new Map(); // node id -> runs this page has had a Stream for (never joined again)
  }

  _adopt(node, s) {
    if (!this.seen.has(node)) this.seen.set(node, new Set());
    this.seen.get(node).add(s.run);
    this.streams.set(node, s);
    this.notes.delete(node);
    return s;
  }

  /** The note for a node (or null): {kind: "waiting", on} | {kind: "running"} | {kind: "cached"}. */
  note(nodeId) {
    return this.notes.get(String(nodeId)) || null;
  }

  /**
   * Apply one of ComfyUI's own events: execution_start (with `samplers`, this page's sampler ids),
   * executing (detail: a node id, an object with `node`, or null when the prompt ends),
   * execution_cached ({nodes}), execution_success / execution_error / execution_interrupted.
   * `title(id)` names a node. Returns true when a note changed.
   */
  comfy(type, detail, { samplers = [], title = (id) => `node ${id}` } = {}) {
    const before = JSON.stringify([...this.notes]);
    const end = () => {
      this.pending.clear();
      for (const [id, n] of this.notes) if (n.kind !== "cached") this.notes.delete(id);
    };
    if (type === "execution_start") {
      this.pending = new Set(samplers.map(String));
      for (const id of this.pending) this.notes.set(id, { kind: "waiting", on: null });
    } else if (type === "execution_cached") {
      for (const id of (detail && detail.nodes) || []) {
        const key = String(id);
        if (!this.accept(key)) continue;
        this.pending.delete(key);
        const s = this.get(key);
        if (s) {
          s.cached = true;
          s.version++;
          this.notes.delete(key);
        } else this.notes.set(key, { kind: "cached" });
      }
    } else if (type === "executing") {
      const raw = detail !== null && typeof detail === "object" ? detail.node : detail;
      if (raw === null || raw === undefined) end();
      else if (this.accept(String(raw))) {
        this.pending.delete(String(raw));
        const s = this.get(raw);
        if (!s || s.status !== "running") this.notes.set(String(raw), { kind: "running" });
      } else for (const id of this.pending) this.notes.set(id, { kind: "waiting", on: title(String(raw)) });
    } else if (["execution_success", "execution_error", "execution_interrupted"].includes(type)) end();
    return JSON.stringify([...this.notes]) !== before;
  }

  get(nodeId) {
    return this.streams.get(String(nodeId)) || null;
  }

  forget(nodeId) {
    this.streams.delete(String(nodeId));
    this.notes.delete(String(nodeId));
  }

  /** Apply one event; returns the Stream it changed, or null when the event was ignored. */
  handle(type, detail) {
    if (!detail || typeof detail !== "object" || detail.node === undefined || detail.run === undefined) return null;
    const node = String(detail.node);
    const kind = type.startsWith(EVENT_PREFIX) ? type.slice(EVENT_PREFIX.length) : type;
    if (kind === "start") {
      if (!this.accept(node)) return null;
      return this._adopt(node, new Stream(detail)); // a new run supersedes what this node showed before
    }
    let s = this.streams.get(node);
    if ((!s || s.run !== String(detail.run)) && (kind === "state" || kind === "frames") &&
        detail.frames_total !== undefined && this.accept(node) && !this.seen.get(node)?.has(String(detail.run))) {
      s = this._adopt(node, new Stream(detail)); // a run already going when this page (re)loaded: join it
      s.joined = true;
    }
    if (!s || s.run !== String(detail.run)) return null; // unknown node or superseded run
    if (kind === "state") s.onState(detail);
    else if (kind === "frames") s.onFrames(detail);
    else if (kind === "done") s.onDone(detail);
    else if (kind === "switch") s.onSwitch(detail);
    else return null;
    return s;
  }
}

/** What a note from Hub.comfy says (or null). */
function noteText(note) {
  if (!note) return null;
  if (note.kind === "waiting") return note.on ? `Waiting for ${note.on} (runs before this node)…` : "Queued: waiting for the nodes before this one…";
  if (note.kind === "running") return "Running: frames appear here as blocks finish…";
  return "From the cache: ComfyUI reused an earlier run's outputs (same inputs) and this page has not seen its frames; change the seed or an input to stream again.";
}

/**
 * The last SWITCHES_SHOWN switches of a Stream as lines [{text, dropped}], oldest first: "block 4: a red
 * fox" for a landed one, "not used: a red fox (why)" with dropped true for one that could not land, led
 * by "… N earlier switches" when there were more.
 */
function switchLines(s) {
  const lines = s.switches.slice(-SWITCHES_SHOWN).map((w) => (w.dropped
    ? { text: `not used: ${w.text} (${w.dropped})`, dropped: true }
    : { text: `block ${w.block}: ${w.text}`, dropped: false }));
  const earlier = s.switchCount - lines.length;
  if (earlier > 0) lines.unshift({ text: `… ${earlier} earlier switch${earlier === 1 ? "" : "es"}`, dropped: false });
  return lines;
}

/**
 * Short status lines for a Stream (or null) and the node's note (Hub.note), shared by the widget and the
 * test harness: {status, stats, cascade, settings} strings and `switches` (the steered prompts, see
 * switchLines).
 */
export function describe(s, note = null) {
  if (!s) return { status: noteText(note) || "No stream yet: queue the workflow to watch frames arrive here.", stats: "", cascade: "", settings: "", switches: [] };
  const f1 = (x) => x.toFixed(1);
  let status;
  if (s.status === "error") status = `Error: ${s.error}`;
  else if (s.status === "done") status = s.received ? `Done in ${f1(s.seconds)} s` : `Done in ${f1(s.seconds)} s, no frames received`;
  else status = s.received ? "Streaming" : "Waiting for the first frame…";
  if (s.joined && s.received) status += ` (joined during the run: from frame ${s.frames.findIndex((f) => f !== undefined) + 1})`;
  if (s.cached) status = `From the cache (same inputs): the last run's frames. ${status}`;
  status = noteText(note) || status;
  const total = s.framesTotal ? `/${s.framesTotal}` : "";
  const stats = [
    `${s.received}${total} frames`,
    `gen ${f1(s.genFps)} fps (play ${s.fps})`,
    s.firstFrameAt === null ? "first frame –" : `first frame ${s.firstFrameAt.toFixed(2)} s`,
    `buffer ${s.buffered}`,
  ].join(" · ");
  let cascade = "";
  if (s.state) {
    cascade = `tick ${s.state.tick}/${s.state.ticks} · blocks done ${s.state.doneBlocks}/${s.blocks}`;
  }
  return { status, stats, cascade, settings: s.settings, switches: switchLines(s) };
}
