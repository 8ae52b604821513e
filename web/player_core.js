// Block Cascade player: pure bookkeeping (no DOM, no ComfyUI), so `node --test` can exercise it.
//
// Events (websocket, JSON; `detail` is the event's data; META = node, run, blocks, frames_total, fps,
// width, height, stages, parallel, clean_pass, steerable (a CLIP is connected), compiling (the layers are
// being compiled for this video size: the first frames come after it), settings, repeated in
// state and frames so a page reloaded mid-run joins):
// META may carry live_input: the live video input a Video-to-Video run reads ("webcam": the widget offers its
// webcam button; "mjpeg").
//   block_cascade.start  {META}
//   block_cascade.state  {META, tick, ticks, pairs: [[block, stage], ...], done_blocks, elapsed}
//   block_cascade.frames {META, block, first_frame, frames: [base64 JPEG, ...], elapsed}
//     (block -1: the frames of a context before block 0, a start image or the video continued)
//   block_cascade.done   {node, run, seconds, frames, blocks, error?, stopped?, video?: {filename, subfolder, type}}
//     (stopped: ended by Cancel, an endless run's normal end; video: the MP4 saved in ComfyUI's output folder,
//     for a stopped run of known length the video so far)
// An endless run (until Cancel) has META blocks 0 and frames_total 0, and state ticks 0 (all unknown);
// its block and frame numbers grow without bound, so a Stream keeps only the last FRAMES_KEPT frames.
//   block_cascade.switch {node, run, block, text, dropped?, blend_blocks?}: a steered prompt landed at `block`
//     (block null and `dropped` saying why when it could not land), blending over `blend_blocks` blocks
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
/** The most frames a Stream keeps (the latest frame indices; older ones are dropped). A preview JPEG
 * (longest side 320 px, quality 80) is about 10-20 kB, so about 14-27 kB as a base64 string: 1000
 * frames (about a minute at 16 fps) bound a Stream's frames to about 15-30 MB. */
export const FRAMES_KEPT = 1000;
/** An endless stream plays live: once more than LIVE_MAX_BEHIND_S seconds of frames wait behind the
 * newest, playback jumps to LIVE_BEHIND_S seconds behind it (the generator may outrun 16 fps; the frames
 * skipped are in the saved video), so what a steered prompt changes shows within seconds. */
export const LIVE_MAX_BEHIND_S = 3;
export const LIVE_BEHIND_S = 1;
/** Notes that outlive the prompt they are about (what happened to the node's last run). */
const LASTING_NOTES = ["cached", "failed", "interrupted"];
/** How many of the latest blocks the timeline of an endless run spans (its switch ticks move left). */
export const ENDLESS_TIMELINE_BLOCKS = 50;

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
    this.steerable = start.steerable !== false; // a CLIP is connected (older servers do not say: assume so)
    this.parallel = num(start.parallel, 1);
    this.settings = typeof start.settings === "string" ? start.settings : ""; // the run's effective sampling settings
    this.compiling = start.compiling === true; // compiling its layers first (until the first block is done)
    this.liveInput = typeof start.live_input === "string" ? start.live_input : ""; // "webcam": it reads the camera
    this.frames = new Map(); // frame index -> base64 JPEG, the last FRAMES_KEPT indices at most
    this.last = -1; // the highest frame index received
    this.oldest = -1; // the lowest frame index kept (-1: none)
    this.received = 0; // distinct frames received (kept or dropped since)
    this.dropped = 0; // frames dropped to keep FRAMES_KEPT
    this.joinedFrom = -1; // the first frame index received after joining a run mid-way
    this.newestBlock = -1; // the highest block number seen (in frames, state or switches)
    this.elapsed = 0; // seconds since run start, latest the backend told us
    this.firstFrameAt = null; // seconds from the run's start to its first generated block (the log's "first block")
    this.state = null; // {tick, ticks, pairs, doneBlocks}
    this.switches = []; // steered prompts of this run, oldest first: [{block (null: dropped), text, dropped}]
    this.switchCount = 0; // switches told so far (the list keeps the last SWITCHES_KEPT)
    this.status = "running"; // running | done | error
    this.joined = false; // picked up mid-run (page reloaded): frames before the join are missing
    this.cached = false; // ComfyUI answered a later prompt from the cache: these are that run's frames
    this.stopped = false; // ended by Cancel, what was made kept (status "done")
    this.video = null; // {filename, subfolder, type}: the MP4 ComfyUI saved, when done told it
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

  /** An endless run (blocks 0: until Cancel). */
  get endless() {
    return this.blocks === 0;
  }

  /** The base64 JPEG of frame `i`, or undefined (not received, or dropped). */
  frame(i) {
    return this.frames.get(i);
  }

  _block(b) {
    if (Number.isInteger(b) && b > this.newestBlock) this.newestBlock = b;
  }

  onState(d) {
    this.state = {
      tick: Number(d.tick) || 0,
      ticks: Number(d.ticks) || 0,
      pairs: Array.isArray(d.pairs) ? d.pairs.map(([b, s]) => [Number(b), Number(s)]) : [],
      doneBlocks: Number(d.done_blocks) || 0,
    };
    for (const [b] of this.state.pairs) this._block(b);
    this.compiling = d.compiling === true;
    this._seen(d.elapsed);
    this.version++;
  }

  /** Frames `d.frames` from index `d.first_frame` on. Frames older than the kept window (the last
   * FRAMES_KEPT indices) are ignored; newer ones push the oldest out. */
  onFrames(d) {
    const first = Math.max(0, Math.floor(Number(d.first_frame)) || 0);
    const list = Array.isArray(d.frames) ? d.frames : [];
    if (this.joined && this.received === 0 && list.length) this.playhead = this.joinedFrom = first; // play from the join
    list.forEach((f, k) => {
      const i = first + k;
      if (typeof f !== "string" || !f || i <= this.last - FRAMES_KEPT) return;
      if (!this.frames.has(i)) this.received++;
      this.frames.set(i, f);
      if (this.oldest < 0 || i < this.oldest) this.oldest = i;
      if (i > this.last) this.last = i;
    });
    this._drop();
    this._block(Number(d.block));
    // "first frame": the first generated block's (not a start image's), timed as the log times it
    if (list.length && this.firstFrameAt === null && Number(d.block) >= 0) {
      this.firstFrameAt = Number.isFinite(Number(d.first_block_s)) && d.first_block_s !== null
        ? Number(d.first_block_s) : Number(d.elapsed) || 0;
    }
    this._seen(d.elapsed);
    this.version++;
  }

  /** Drop the frames below the kept window; `oldest` moves to the lowest index still kept. */
  _drop() {
    const cut = this.last - FRAMES_KEPT + 1; // the lowest index that may stay
    if (this.oldest < 0 || this.oldest >= cut) return;
    const before = this.frames.size;
    if (cut - this.oldest > before) {
      for (const i of this.frames.keys()) if (i < cut) this.frames.delete(i);
    } else for (let i = this.oldest; i < cut; i++) this.frames.delete(i);
    this.dropped += before - this.frames.size;
    let i = cut;
    while (!this.frames.has(i)) i++; // frame `last` is kept, so this stops
    this.oldest = i;
  }

  /** The run ended: done, an error, or (`d.stopped`) stopped by Cancel, with `d.video`
   * naming the MP4 ComfyUI saved ({filename, subfolder, type}; ignored without a filename). */
  onDone(d) {
    this.status = d.error ? "error" : "done";
    this.error = d.error ? String(d.error) : null;
    this.stopped = !d.error && Boolean(d.stopped);
    const v = d.video;
    this.video = v && typeof v === "object" && typeof v.filename === "string" && v.filename
      ? { filename: v.filename, subfolder: String(v.subfolder ?? ""), type: String(v.type || "output") } : null;
    this.seconds = Number.isFinite(Number(d.seconds)) ? Number(d.seconds) : this.elapsed;
    if (this.state) {
      this.state = { ...this.state, pairs: [] };
      if (!d.error && !this.stopped && !this.endless) Object.assign(this.state, { tick: this.state.ticks, doneBlocks: this.blocks });
      else if (Number.isFinite(Number(d.blocks))) this.state.doneBlocks = Number(d.blocks); // = frames shown
    }
    this.version++;
  }

  /** A steered prompt landed at `d.block`, or (`d.dropped`: why) could not land. */
  onSwitch(d) {
    const block = Number.isInteger(d.block) && !d.dropped ? d.block : null;
    const blend = Number.isInteger(d.blend_blocks) && d.blend_blocks > 0 ? { blend: d.blend_blocks } : {}; // blocks blended over
    this.switches.push({ block, text: String(d.text ?? ""), dropped: d.dropped ? String(d.dropped) : "", ...blend });
    this._block(block);
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

  /** The highest frame index received (-1: none yet). */
  get lastIndex() {
    return this.last;
  }

  /** Frames ready to play after the one on screen (contiguous). */
  get buffered() {
    let n = 0;
    while (this.frames.has(this.playhead + n)) n++;
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
    if (this.playhead <= this.last - FRAMES_KEPT) this.playhead = this.oldest; // fell behind the kept frames
    if (this.endless && this.status === "running" && this.last - this.playhead > LIVE_MAX_BEHIND_S * this.fps) {
      this.playhead = Math.max(this.oldest, this.last - Math.round(LIVE_BEHIND_S * this.fps)); // back to live
    }
    if (this.status !== "running") {
      // finished: skip frames that never came, stop after the last one
      while (this.playhead <= this.lastIndex && !this.frames.has(this.playhead)) this.playhead++;
      if (this.playhead > this.lastIndex) {
        this.playing = false;
        this.version++;
        return false;
      }
    }
    if (!this.frames.has(this.playhead)) return false; // waiting for the generator
    this.shown = this.playhead++;
    this.shownAt = now;
    // keep a steady cadence, but after a stall restart from now instead of catching up in a burst
    const late = this.nextDue === null || now - this.nextDue > this.interval;
    this.nextDue = (late ? now : this.nextDue) + this.interval;
    this.version++;
    return true;
  }

  /** Show frame `i` now (clamped to the kept frames); playback continues from the next one. */
  seek(i) {
    if (this.frames.size === 0) return;
    this.shown = Math.max(this.oldest, Math.min(this.lastIndex, Math.round(Number(i) || 0)));
    this.playhead = this.shown + 1;
    this.shownAt = null;
    this.nextDue = null;
    this.version++;
  }

  play() {
    if (this.status !== "running" && this.playhead > this.lastIndex) {
      this.playhead = Math.max(0, this.oldest); // replay from the oldest frame kept
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

  /** The note for a node (or null): {kind: "waiting", on} | {kind: "running"} | {kind: "cached"} |
   * {kind: "failed", on, error} (the last prompt failed in node `on`, this one when null, before this node
   * streamed) | {kind: "interrupted", started?} (cancelled before this node ran, or, `started`, while it was
   * starting: before its stream began). */
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
      for (const [id, n] of this.notes) if (!LASTING_NOTES.includes(n.kind)) this.notes.delete(id);
    };
    // the prompt ended without this node's stream: say why on the samplers that never streamed in it
    const notRun = (note) => {
      for (const [id, n] of this.notes) if (n.kind === "waiting" || n.kind === "running") this.notes.set(id, note(id));
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
        // its own stream shows what it does; else say it runs (a stale "waiting" note never stays)
        if (!s || s.status !== "running") this.notes.set(String(raw), { kind: "running" });
        else this.notes.delete(String(raw));
      } else for (const id of this.pending) this.notes.set(id, { kind: "waiting", on: title(String(raw)) });
    } else if (type === "execution_error") {
      const at = detail && detail.node_id !== undefined && detail.node_id !== null ? String(detail.node_id) : null;
      const error = String((detail && detail.exception_message) || "failed").trim().split("\n")[0];
      notRun((id) => ({ kind: "failed", on: at === null || at === id ? null : title(at), error }));
      end();
    } else if (type === "execution_interrupted") {
      for (const [id, n] of this.notes) if (n.kind === "running") this.notes.set(id, { kind: "interrupted", started: true });
      notRun(() => ({ kind: "interrupted" }));
      end();
    } else if (type === "execution_success") end();
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
