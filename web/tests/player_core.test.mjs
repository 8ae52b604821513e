// node --test web/tests/
import { test } from "node:test";
import assert from "node:assert/strict";
import { EVENTS, FRAMES_KEPT, Hub, LIVE_BEHIND_S, LIVE_MAX_BEHIND_S, SWITCHES_KEPT, SWITCHES_SHOWN, Stream }
  from "../player_core.js";
import { describe, switchTicks } from "../player_describe.js";

const START = { node: "7", run: "r1", blocks: 3, frames_total: 12, fps: 16, width: 64, height: 40, stages: 5, parallel: 2 };
const frames = (node, run, first, n, elapsed = 1) =>
  ({ node, run, block: first / 4, first_frame: first, frames: Array.from({ length: n }, (_, i) => `f${first + i}`), elapsed });

function started(accept) {
  const hub = new Hub(accept ? { accept } : undefined);
  hub.handle("block_cascade.start", START);
  return [hub, hub.get("7")];
}

test("event names", () => {
  assert.deepEqual(EVENTS, ["block_cascade.start", "block_cascade.state", "block_cascade.frames", "block_cascade.done",
    "block_cascade.switch"]);
});

test("start creates a stream per node with its metadata", () => {
  const [hub, s] = started();
  assert.equal(s.fps, 16);
  assert.equal(s.framesTotal, 12);
  assert.equal(s.status, "running");
  assert.equal(hub.get(7), s, "numeric node ids find the same stream");
  assert.equal(hub.get("8"), null);
});

test("events for unknown nodes, superseded runs and malformed payloads are ignored", () => {
  const [hub, s] = started((id) => id === "7");
  assert.equal(hub.handle("block_cascade.start", { ...START, node: "99" }), null, "accept() refuses node 99");
  assert.equal(hub.handle("block_cascade.frames", frames("99", "r1", 0, 4)), null);
  assert.equal(hub.handle("block_cascade.frames", frames("7", "old", 0, 4)), null);
  assert.equal(hub.handle("block_cascade.frames", null), null);
  assert.equal(hub.handle("block_cascade.frames", { node: "7" }), null);
  assert.equal(hub.handle("block_cascade.bogus", { node: "7", run: "r1" }), null);
  assert.equal(s.received, 0);
  // a new run on the same node replaces the stream; the old run's late frames do not leak in
  hub.handle("block_cascade.start", { ...START, run: "r2" });
  const s2 = hub.get("7");
  assert.notEqual(s2, s);
  assert.equal(hub.handle("block_cascade.frames", frames("7", "r1", 0, 4)), null);
  assert.equal(hub.handle("block_cascade.frames", frames("7", "r2", 0, 4)), s2);
  assert.equal(s2.received, 4);
});

test("several nodes keep separate streams", () => {
  const hub = new Hub();
  hub.handle("block_cascade.start", START);
  hub.handle("block_cascade.start", { ...START, node: "8", run: "x", fps: 8 });
  hub.handle("block_cascade.frames", frames("8", "x", 0, 2));
  assert.equal(hub.get("7").received, 0);
  assert.equal(hub.get("8").received, 2);
  assert.equal(hub.get("8").fps, 8);
  hub.forget("8");
  assert.equal(hub.get("8"), null);
});

test("frames, generation fps, time to first frame, duplicates", () => {
  const [hub, s] = started();
  hub.handle("block_cascade.frames", frames("7", "r1", 0, 4, 0.5));
  hub.handle("block_cascade.frames", frames("7", "r1", 4, 4, 1.0));
  hub.handle("block_cascade.frames", frames("7", "r1", 4, 4, 1.0)); // repeated message
  assert.equal(s.received, 8);
  assert.equal(s.firstFrameAt, 0.5);
  assert.equal(s.genFps, 8);
  assert.equal(s.frame(5), "f5");
});

test("the first frame is the first generated block's, timed as the log times it (not a start image's)", () => {
  const [hub, s] = started();
  hub.handle("block_cascade.frames", { ...frames("7", "r1", 0, 1, 0.4), block: -1 }); // the start image
  assert.equal(s.firstFrameAt, null);
  hub.handle("block_cascade.frames", { ...frames("7", "r1", 1, 8, 5.46), block: 0, first_block_s: 0.22 });
  assert.equal(s.firstFrameAt, 0.22);
  assert.match(describe(s).stats, /first frame 0\.22 s/);
  hub.handle("block_cascade.frames", { ...frames("7", "r1", 9, 4, 6), block: 1 });
  assert.equal(s.firstFrameAt, 0.22, "set once");
});

test("the widget says what happened to the last run: failed before it, failed in it, cancelled before it", () => {
  const hub = new Hub();
  const title = (id) => `“Loader ${id}”`;
  hub.comfy("execution_start", {}, { samplers: ["7", "9"], title });
  hub.comfy("executing", "3", { title });
  hub.comfy("execution_error", { node_id: "3", exception_message: "file not found\ntrace..." }, { title });
  assert.equal(describe(null, hub.note("7")).status, "Not run: “Loader 3” failed before it (file not found)");
  hub.comfy("executing", null, { title }); // the prompt's end does not wipe it
  assert.equal(hub.note("9").kind, "failed");
  hub.comfy("execution_start", {}, { samplers: ["7"], title });
  assert.equal(hub.note("7").kind, "waiting", "a new prompt: waiting again");
  hub.comfy("executing", "7", { title });
  hub.comfy("execution_error", { node_id: "7", exception_message: "width: must be a multiple of 16" }, { title });
  assert.equal(describe(null, hub.note("7")).status, "Error: width: must be a multiple of 16");
  hub.comfy("execution_start", {}, { samplers: ["7"], title });
  hub.comfy("execution_interrupted", { node_id: "2" }, { title });
  assert.equal(describe(null, hub.note("7")).status, "Cancelled before this node ran");
  hub.comfy("execution_start", {}, { samplers: ["7"], title });
  hub.comfy("executing", "7", { title });
  hub.comfy("execution_interrupted", { node_id: "7" }, { title });
  assert.equal(describe(null, hub.note("7")).status, "Cancelled while this node was starting (before its first block)");
});

test("a sampler that runs never keeps a stale waiting note, even beside a stream whose end was missed", () => {
  const hub = new Hub();
  hub.handle("block_cascade.start", START); // its done never came (a dropped socket)
  hub.comfy("execution_start", {}, { samplers: ["7"] });
  hub.comfy("executing", "3", { title: () => "node 3" });
  assert.equal(hub.note("7").kind, "waiting");
  hub.comfy("executing", "7");
  assert.equal(hub.note("7"), null, "the stream's own status shows, not 'waiting for node 3'");
});

test("cascade state rows: steps and the clean pass", () => {
  const [hub, s] = started();
  hub.handle("block_cascade.state", { node: "7", run: "r1", tick: 3, ticks: 10, pairs: [[0, 4], [1, 2]], done_blocks: 0, elapsed: 0.3 });
  assert.deepEqual(s.cascade, [{ block: 0, stage: 4, clean: true }, { block: 1, stage: 2, clean: false }]);
  const krea = new Hub().handle("block_cascade.start", { ...START, node: "8", clean_pass: false });
  krea.state = { tick: 3, ticks: 10, pairs: [[0, 4]], doneBlocks: 0 };
  assert.deepEqual(krea.cascade, [{ block: 0, stage: 4, clean: false }], "without clean passes the last stage is a step");
  assert.equal(s.elapsed, 0.3);
  assert.match(describe(s).cascade, /tick 3\/10 · blocks done 0\/3/);
  hub.handle("block_cascade.done", { node: "7", run: "r1", seconds: 2, frames: 0 });
  assert.deepEqual(s.cascade, [], "nothing in flight after done");
});

test("playback never runs faster than fps and buffers when frames arrive early", () => {
  const [hub, s] = started();
  hub.handle("block_cascade.frames", frames("7", "r1", 0, 8)); // 8 frames at once
  const shownAt = [];
  for (let t = 0; t <= 1000; t += 4) if (s.tick(t)) shownAt.push([t, s.shown]);
  assert.equal(shownAt.length, 8);
  assert.deepEqual(shownAt.map(([, i]) => i), [0, 1, 2, 3, 4, 5, 6, 7]);
  // the k-th frame never comes before k intervals (62.5 ms at 16 fps) after the first
  for (let k = 1; k < shownAt.length; k++) assert.ok(shownAt[k][0] - shownAt[0][0] >= k * 62.5, `frame ${k} too early`);
  assert.ok(shownAt[7][0] <= 7 * 62.5 + 4);
});

test("playback waits for late frames and resumes without a burst", () => {
  const [hub, s] = started();
  hub.handle("block_cascade.frames", frames("7", "r1", 0, 2));
  assert.ok(s.tick(0));
  assert.ok(!s.tick(30));
  assert.ok(s.tick(63));
  assert.equal(s.buffered, 0);
  assert.ok(!s.tick(500), "nothing to show: wait");
  assert.equal(s.shown, 1);
  hub.handle("block_cascade.frames", frames("7", "r1", 2, 4));
  assert.ok(s.tick(1000), "shown as soon as it arrives");
  assert.ok(!s.tick(1001), "then back to the fps cadence, no catch-up burst");
  assert.ok(s.tick(1063));
  assert.equal(s.shown, 3);
});

test("out-of-order blocks play in index order", () => {
  const [hub, s] = started();
  hub.handle("block_cascade.frames", frames("7", "r1", 4, 4));
  assert.ok(!s.tick(0), "frame 0 missing: wait");
  hub.handle("block_cascade.frames", frames("7", "r1", 0, 4));
  assert.ok(s.tick(10));
  assert.equal(s.shown, 0);
});

test("after done: stop at the end, replay, pause, seek", () => {
  const [hub, s] = started();
  hub.handle("block_cascade.frames", frames("7", "r1", 0, 4));
  hub.handle("block_cascade.done", { node: "7", run: "r1", seconds: 1.5, frames: 4 });
  let t = 0;
  while (s.playing && t < 2000) s.tick((t += 10));
  assert.equal(s.shown, 3);
  assert.equal(s.playing, false, "stops after the last frame");
  s.play();
  assert.ok(s.tick(t + 100));
  assert.equal(s.shown, 0, "play at the end restarts");
  s.pause();
  assert.ok(!s.tick(t + 1000));
  s.seek(2);
  assert.equal(s.shown, 2);
  s.seek(99);
  assert.equal(s.shown, 3, "clamped");
  assert.match(describe(s).status, /Done in 1\.5 s/);
});

test("done with an error, with no frames, and the empty state", () => {
  const [hub, s] = started();
  assert.match(describe(s).status, /Waiting for the first frame/);
  hub.handle("block_cascade.done", { node: "7", run: "r1", seconds: 0.2, frames: 0, error: "CUDA out of memory" });
  assert.equal(s.status, "error");
  assert.match(describe(s).status, /Error: CUDA out of memory/);
  assert.ok(!s.tick(0));
  assert.equal(s.playing, false);
  s.seek(3); // no frames: no-op
  assert.equal(s.shown, -1);
  assert.match(describe(null).status, /No stream yet/);
});

test("finished runs skip frames that never came", () => {
  const [hub, s] = started();
  hub.handle("block_cascade.frames", frames("7", "r1", 0, 2));
  hub.handle("block_cascade.frames", frames("7", "r1", 4, 2));
  hub.handle("block_cascade.done", { node: "7", run: "r1", seconds: 1, frames: 4 });
  const seen = [];
  for (let t = 0; t < 1000; t += 10) if (s.tick(t)) seen.push(s.shown);
  assert.deepEqual(seen, [0, 1, 4, 5]);
});

const META = { blocks: 3, frames_total: 12, fps: 16, width: 64, height: 40, stages: 5, parallel: 2 };

test("a cached re-run keeps the last run's frames and says they come from the cache", () => {
  const [hub, s] = started();
  hub.handle("block_cascade.frames", frames("7", "r1", 0, 4));
  hub.handle("block_cascade.done", { node: "7", run: "r1", seconds: 1, frames: 4, blocks: 1 });
  hub.comfy("execution_start", { prompt_id: "p2" }, { samplers: ["7"] });
  hub.comfy("execution_cached", { nodes: ["1", "7"] });
  hub.comfy("execution_success", {});
  hub.comfy("executing", null);
  assert.equal(hub.get("7"), s, "the stream and its frames stay");
  assert.equal(s.received, 4);
  assert.match(describe(s, hub.note("7")).status, /^From the cache \(same inputs\): the last run's frames\. Done in 1\.0 s/);
  // a page that never saw the run (reloaded) says where the outputs came from instead of "No stream yet"
  const fresh = new Hub();
  fresh.comfy("execution_cached", { nodes: ["7"] });
  assert.equal(fresh.get("7"), null);
  assert.match(describe(null, fresh.note("7")).status, /^From the cache: ComfyUI reused an earlier run's outputs/);
  // the next real run replaces the cached view
  fresh.handle("block_cascade.start", START);
  assert.doesNotMatch(describe(fresh.get("7"), fresh.note("7")).status, /cache/);
});

test("a page reloaded during a run picks the running stream up at its next event", () => {
  const hub = new Hub({ accept: (id) => id === "7" });
  hub.comfy("executing", "7"); // ComfyUI tells a reconnecting client which node runs
  assert.match(describe(hub.get("7"), hub.note("7")).status, /^Running/);
  hub.handle("block_cascade.state", { ...META, node: "7", run: "r1", tick: 3, ticks: 9, pairs: [[1, 0]], done_blocks: 1, elapsed: 2 });
  const s = hub.get("7");
  assert.ok(s && s.joined && s.framesTotal === 12 && s.state.tick === 3);
  assert.equal(hub.handle("block_cascade.frames", { ...META, ...frames("7", "r1", 4, 4, 2.5) }), s);
  assert.ok(s.tick(0) && s.shown === 4, "playback starts at the first frame received, not at a missing frame 0");
  assert.match(describe(s, hub.note("7")).status, /^Streaming \(joined during the run: from frame 5\)/);
  // a superseded run's late events are not joined
  hub.handle("block_cascade.start", { ...START, run: "r2" });
  assert.equal(hub.handle("block_cascade.frames", { ...META, ...frames("7", "r1", 8, 4) }), null);
  assert.equal(hub.get("7").run, "r2");
});

test("while upstream nodes run, the widget says what it waits for", () => {
  const hub = new Hub({ accept: (id) => id === "7" });
  const names = { 3: "“Load Causal Video Model”" };
  hub.comfy("execution_start", { prompt_id: "p" }, { samplers: ["7"] });
  assert.match(describe(null, hub.note("7")).status, /^Queued: waiting for the nodes before this one/);
  hub.comfy("executing", { node: "3", display_node: "3", prompt_id: "p" }, { title: (id) => names[id] });
  assert.equal(describe(null, hub.note("7")).status, "Waiting for “Load Causal Video Model” (runs before this node)…");
  hub.comfy("executing", "7");
  assert.match(describe(null, hub.note("7")).status, /^Running/);
  hub.handle("block_cascade.start", START);
  assert.equal(describe(hub.get("7"), hub.note("7")).status, "Waiting for the first frame…");
  hub.comfy("execution_interrupted", {});
  assert.equal(hub.note("7"), null);
});

test("after a Cancel the block and frame counters agree with the frames shown", () => {
  const [hub, s] = started();
  hub.handle("block_cascade.state", { node: "7", run: "r1", tick: 5, ticks: 9, pairs: [[1, 4], [2, 2]], done_blocks: 2, elapsed: 1 });
  hub.handle("block_cascade.frames", frames("7", "r1", 0, 4));
  // block 1 finished in the engine, but Cancel came during its decode: its frames never came
  hub.handle("block_cascade.done", { node: "7", run: "r1", seconds: 1.2, frames: 4, blocks: 1, error: "interrupted" });
  const d = describe(s);
  assert.match(d.stats, /^4\/12 frames/);
  assert.equal(d.cascade, "tick 5/9 · blocks done 1/3");
});

test("the run's effective settings are shown as the backend names them", () => {
  const hub = new Hub();
  hub.handle("block_cascade.start", { ...START, settings: "longlive: window 12 (sink 3); switch recache" });
  assert.equal(describe(hub.get("7")).settings, "longlive: window 12 (sink 3); switch recache");
  hub.handle("block_cascade.start", { ...START, run: "r2", settings: 42 });
  assert.equal(describe(hub.get("7")).settings, "", "a non-string is not shown");
  assert.equal(describe(null).settings, "");
});

test("steered switches: kept per run, dropped ones with their reason, other runs and nodes ignored", () => {
  const [hub, s] = started((id) => id === "7");
  const v = s.version;
  assert.equal(hub.handle("block_cascade.switch", { node: "7", run: "r1", block: 4, text: "a red fox" }), s);
  assert.ok(s.version > v, "the view re-renders");
  hub.handle("block_cascade.switch", { node: "7", run: "r1", block: null, text: "snow", dropped: "no block left" });
  assert.equal(hub.handle("block_cascade.switch", { node: "7", run: "old", block: 1, text: "stale" }), null);
  assert.equal(hub.handle("block_cascade.switch", { node: "99", run: "r1", block: 1, text: "foreign" }), null);
  assert.deepEqual(s.switches, [{ block: 4, text: "a red fox", dropped: "" }, { block: null, text: "snow", dropped: "no block left" }]);
  assert.deepEqual(describe(s).switches, [
    { text: "block 4: a red fox", dropped: false },
    { text: "not used: snow (no block left)", dropped: true },
  ]);
  assert.deepEqual(describe(null).switches, []);
  // a switch blending over N blocks says so (an odd blend_blocks is ignored)
  hub.handle("block_cascade.switch", { node: "7", run: "r1", block: 6, text: "dusk", blend_blocks: 4 });
  hub.handle("block_cascade.switch", { node: "7", run: "r1", block: 7, text: "night", blend_blocks: "x" });
  assert.deepEqual(s.switches.slice(2), [{ block: 6, text: "dusk", dropped: "", blend: 4 }, { block: 7, text: "night", dropped: "" }]);
  assert.deepEqual(describe(s).switches.slice(2).map((l) => l.text), ["block 6 (blend 4): dusk", "block 7: night"]);
  s.switches.splice(2);
  s.switchCount -= 2;
  // switches survive the run's end; a new run starts with none
  hub.handle("block_cascade.done", { node: "7", run: "r1", seconds: 1, frames: 0 });
  assert.equal(hub.get("7").switches.length, 2);
  hub.handle("block_cascade.start", { ...START, run: "r2" });
  assert.deepEqual(hub.get("7").switches, []);
  assert.deepEqual(describe(hub.get("7")).switches, []);
});

test("the switch list stays bounded and the view lists the latest few", () => {
  const [hub, s] = started();
  const n = SWITCHES_KEPT + 7;
  for (let k = 0; k < n; k++) hub.handle("block_cascade.switch", { node: "7", run: "r1", block: k, text: `p${k}` });
  assert.equal(s.switches.length, SWITCHES_KEPT);
  assert.deepEqual(s.switches[0], { block: 7, text: "p7", dropped: "" }, "the oldest ones go first");
  assert.deepEqual(s.switches.at(-1), { block: n - 1, text: `p${n - 1}`, dropped: "" });
  const lines = describe(s).switches.map((l) => l.text);
  const last = Array.from({ length: SWITCHES_SHOWN }, (_, i) => `block ${n - SWITCHES_SHOWN + i}: p${n - SWITCHES_SHOWN + i}`);
  assert.deepEqual(lines, [`… ${n - SWITCHES_SHOWN} earlier switches`, ...last]);
});

const ENDLESS = { ...START, blocks: 0, frames_total: 0 };
const block12 = (b, run = "r1") => ({ ...ENDLESS, run, block: b, first_frame: 12 * b,
  frames: Array.from({ length: 12 }, (_, i) => `b${b}f${i}`), elapsed: b });

test("a long run of known length that fell behind the kept frames plays on from the oldest kept", () => {
  const hub = new Hub();
  const blocks = Math.ceil((FRAMES_KEPT + 500) / 12);
  const finite = { ...START, blocks, frames_total: 12 * blocks };
  hub.handle("block_cascade.start", finite);
  const s = hub.get("7");
  for (let b = 0; b < blocks; b++) hub.handle("block_cascade.frames", { ...block12(b), ...finite, block: b });
  assert.ok(s.tick(0));
  assert.equal(s.shown, 12 * blocks - FRAMES_KEPT);
  assert.equal(s.buffered, FRAMES_KEPT - 1, "a run of known length plays every frame kept");
});

test("an endless stream plays live: never more than LIVE_MAX_BEHIND_S seconds behind the newest frame", () => {
  const hub = new Hub();
  hub.handle("block_cascade.start", ENDLESS);
  const s = hub.get("7");
  hub.handle("block_cascade.frames", block12(0));
  assert.ok(s.tick(0) && s.shown === 0);
  for (let b = 1; b <= 4; b++) hub.handle("block_cascade.frames", block12(b)); // 59 behind: within 3 s at 16 fps?
  assert.ok(s.tick(100));
  assert.equal(s.shown, 59 - 16, "more than 48 frames behind: back to 16 behind the newest");
  hub.handle("block_cascade.frames", block12(5)); // 71 is the newest, 44 the next to play: 27 behind
  assert.ok(s.tick(200));
  assert.equal(s.shown, 44, "within the allowance: every frame plays");
  assert.equal(LIVE_MAX_BEHIND_S * 16, 48);
  s.pause();
  for (let b = 6; b <= 12; b++) hub.handle("block_cascade.frames", block12(b));
  assert.equal(s.tick(300), false, "paused: no jump");
  hub.handle("block_cascade.done", { node: "7", run: "r1", seconds: 9, frames: 156, blocks: 13, stopped: true });
  s.play();
  assert.ok(s.tick(400));
  assert.equal(s.shown, 45, "after the run, what is kept plays in order");
});

test("a Stream keeps the last FRAMES_KEPT frames; playback that fell behind goes on from the oldest kept", () => {
  const hub = new Hub();
  hub.handle("block_cascade.start", ENDLESS);
  const s = hub.get("7");
  hub.handle("block_cascade.frames", block12(0));
  assert.ok(s.tick(0) && s.shown === 0);
  const blocks = Math.ceil((FRAMES_KEPT + 500) / 12);
  for (let b = 1; b < blocks; b++) hub.handle("block_cascade.frames", block12(b));
  const last = 12 * blocks - 1;
  assert.equal(s.received, 12 * blocks, "every frame counted as received");
  assert.equal(s.lastIndex, last);
  assert.equal(s.frames.size, FRAMES_KEPT);
  assert.equal(s.dropped, 12 * blocks - FRAMES_KEPT);
  const oldest = last - FRAMES_KEPT + 1;
  assert.equal(s.oldest, oldest);
  assert.deepEqual([...s.frames.keys()].sort((a, b) => a - b), Array.from({ length: FRAMES_KEPT }, (_, i) => oldest + i));
  assert.equal(s.frame(oldest), `b${Math.floor(oldest / 12)}f${oldest % 12}`);
  assert.equal(s.frame(oldest - 1), undefined);
  assert.ok(s.tick(1000), "far behind the newest frame: an endless stream jumps back to live");
  assert.equal(s.shown, last - LIVE_BEHIND_S * 16);
  assert.equal(s.buffered, LIVE_BEHIND_S * 16);
  assert.match(describe(s).stats, new RegExp(`^${12 * blocks} frames \\(last ${FRAMES_KEPT} kept\\) · `));
  // a late copy of a dropped frame is not taken back; a seek is clamped to the frames kept
  hub.handle("block_cascade.frames", block12(0));
  assert.equal(s.frame(0), undefined);
  assert.equal(s.received, 12 * blocks, "nor counted again");
  assert.equal(s.frames.size, FRAMES_KEPT);
  s.seek(3);
  assert.equal(s.shown, oldest);
  // after done, replay starts at the oldest kept frame
  hub.handle("block_cascade.done", { node: "7", run: "r1", seconds: 9, frames: 12 * blocks, blocks, stopped: true });
  s.seek(last);
  let t = 2000;
  while (s.playing && t < 5000) s.tick((t += 100));
  s.play();
  assert.ok(s.tick(t + 100));
  assert.equal(s.shown, oldest);
});

test("frame numbers far into an endless run, and joining one, hold no more than the frames kept", () => {
  const hub = new Hub({ accept: (id) => id === "7" });
  const b0 = 100000; // a run going on for hours when this page joins it
  for (let b = b0; b < b0 + 200; b++) hub.handle("block_cascade.frames", block12(b));
  const s = hub.get("7");
  assert.ok(s.joined);
  assert.equal(s.frames.size, FRAMES_KEPT);
  assert.equal(s.lastIndex, 12 * (b0 + 200) - 1);
  assert.match(describe(s).status, new RegExp(`^Streaming \\(joined during the run: from frame ${12 * b0 + 1}\\)`));
  assert.ok(s.tick(0));
  assert.equal(s.shown, s.lastIndex - LIVE_BEHIND_S * 16, "a stream joined far behind plays live");
});

test("an endless run says so: no totals of 0, no NaN; stopped by Cancel links its saved video", () => {
  const hub = new Hub();
  hub.handle("block_cascade.start", ENDLESS);
  const s = hub.get("7");
  assert.ok(s.endless);
  hub.handle("block_cascade.state", { ...ENDLESS, tick: 40, ticks: 0, pairs: [[1233, 4], [1234, 1]], done_blocks: 1233, elapsed: 9 });
  hub.handle("block_cascade.frames", block12(1232));
  let d = describe(s);
  assert.equal(d.cascade, "block 1234 · endless: Cancel ends it and keeps the video");
  assert.match(d.stats, /^12 frames · \d+\.\d fps · first frame /);
  assert.match(d.details, /played at 16/);
  for (const line of [d.status, d.stats, d.cascade]) assert.doesNotMatch(line, /NaN|\/0\b|Infinity|undefined/, line);
  const video = { filename: "block_cascade_00001.mp4", subfolder: "", type: "output" };
  hub.handle("block_cascade.done", { node: "7", run: "r1", seconds: 80.25, frames: 12, blocks: 1233, stopped: true, video });
  d = describe(s);
  assert.equal(s.status, "done");
  assert.ok(s.stopped);
  assert.deepEqual(s.video, video);
  assert.equal(d.status, "Stopped by Cancel after 80.3 s: the video is saved");
  assert.equal(d.cascade, "endless: 1233 blocks done");
  // without a video (or a malformed one) the status says stopped, nothing more
  hub.handle("block_cascade.start", { ...ENDLESS, run: "r2" });
  hub.handle("block_cascade.done", { node: "7", run: "r2", seconds: 2, frames: 0, blocks: 0, stopped: true, video: { filename: "" } });
  assert.equal(hub.get("7").video, null);
  assert.equal(describe(hub.get("7")).status, "Stopped by Cancel after 2.0 s");
  assert.equal(describe(hub.get("7")).cascade, "endless: 0 blocks done");
});

test("a run of known length stopped by Cancel says at which block, and links the video so far", () => {
  const hub = new Hub();
  hub.handle("block_cascade.start", START); // 3 blocks
  hub.handle("block_cascade.state", { ...START, tick: 6, ticks: 10, pairs: [[1, 2], [2, 0]], done_blocks: 1, elapsed: 1 });
  const video = { filename: "stream_00002_.mp4", subfolder: "block_cascade", type: "output" };
  hub.handle("block_cascade.done", { node: "7", run: "r1", seconds: 1.5, frames: 9, blocks: 1, stopped: true, video });
  const s = hub.get("7");
  assert.ok(s.stopped && !s.endless);
  assert.deepEqual(s.video, video);
  assert.equal(describe(s).status, "Stopped by Cancel at block 2 of 3: the video so far is saved");
  assert.equal(describe(s).cascade, "tick 6/10 · blocks done 1/3");
  // stopped before any block was final: nothing saved, and it says so
  hub.handle("block_cascade.start", { ...START, run: "r2" });
  hub.handle("block_cascade.state", { ...START, run: "r2", tick: 2, ticks: 10, pairs: [[0, 2]], done_blocks: 0, elapsed: 1 });
  hub.handle("block_cascade.done", { node: "7", run: "r2", seconds: 0.5, frames: 0, blocks: 0, stopped: true });
  assert.equal(describe(hub.get("7")).status, "Stopped by Cancel at block 1 of 3: no block was final yet, nothing to save");
});

test("landed switches are ticks on the timeline: block/blocks, or a window of the latest blocks when endless", () => {
  const [hub, s] = started(); // 3 blocks
  hub.handle("block_cascade.switch", { node: "7", run: "r1", block: 1, text: "a red fox" });
  hub.handle("block_cascade.switch", { node: "7", run: "r1", block: null, text: "snow", dropped: "no block left" });
  hub.handle("block_cascade.switch", { node: "7", run: "r1", block: 2, text: "night" });
  assert.deepEqual(switchTicks(s), [{ pos: 1 / 3, text: "block 1: a red fox" }, { pos: 2 / 3, text: "block 2: night" }]);
  assert.deepEqual(describe(s).ticks, switchTicks(s));
  assert.deepEqual(switchTicks(null), []);
  // endless: the latest 50 blocks, up to the newest block seen
  const e = new Hub();
  e.handle("block_cascade.start", ENDLESS);
  const es = e.get("7");
  e.handle("block_cascade.switch", { node: "7", run: "r1", block: 10, text: "early" });
  assert.deepEqual(switchTicks(es), [{ pos: 10 / 50, text: "block 10: early" }]);
  e.handle("block_cascade.state", { ...ENDLESS, tick: 1, ticks: 0, pairs: [[99, 0]], done_blocks: 98, elapsed: 1 });
  e.handle("block_cascade.switch", { node: "7", run: "r1", block: 70, text: "late" });
  // blocks 50..99 are on the timeline now: block 10 fell off its left end
  assert.deepEqual(switchTicks(es), [{ pos: 20 / 50, text: "block 70: late" }]);
  for (const { pos } of switchTicks(es)) assert.ok(pos >= 0 && pos < 1);
});

test("a run that compiles first says so until its first block, then streams", () => {
  const hub = new Hub();
  hub.handle("block_cascade.start", { ...START, compiling: true });
  const s = hub.get("7");
  assert.match(describe(s).status, /^Compiling \(first run of this size/);
  hub.handle("block_cascade.state", { ...START, compiling: true, tick: 0, ticks: 10, pairs: [[0, 0]], done_blocks: 0 });
  assert.match(describe(s).status, /^Compiling/);
  hub.handle("block_cascade.state", { ...START, compiling: false, tick: 3, ticks: 10, pairs: [[1, 0]], done_blocks: 1 });
  assert.match(describe(s).status, /Waiting for the first frame/);
  hub.handle("block_cascade.frames", { ...START, block: 0, first_frame: 0, frames: ["AAAA"], elapsed: 1 });
  assert.match(describe(s).status, /^Streaming/);
});

test("a run's live input comes from its events (a page reloaded mid-run learns it from the next one)", () => {
  const hub = new Hub();
  hub.handle("block_cascade.start", { ...START, live_input: "webcam" });
  assert.equal(hub.get("7").liveInput, "webcam");
  hub.handle("block_cascade.start", { ...START, run: "r2" }); // a sampler run: no live input
  assert.equal(hub.get("7").liveInput, "");
  const joined = new Hub();
  joined.handle("block_cascade.state", { ...START, run: "r3", live_input: "webcam", tick: 4, ticks: 0, pairs: [[2, 0]],
    done_blocks: 2 });
  assert.equal(joined.get("7").liveInput, "webcam");
  joined.handle("block_cascade.start", { ...START, run: "r4", live_input: 5 }); // not a string: none
  assert.equal(joined.get("7").liveInput, "");
});
