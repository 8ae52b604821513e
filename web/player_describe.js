// Block Cascade player: the words and marks a Stream is shown with (status lines, the steered switches
// and their timeline ticks). No DOM: the widget's view and `node --test` both use it.
import { ENDLESS_TIMELINE_BLOCKS, SWITCHES_SHOWN } from "./player_core.js";

/** What a note from Hub.comfy says (or null). */
function noteText(note) {
  if (!note) return null;
  if (note.kind === "waiting") return note.on ? `Waiting for ${note.on} (runs before this node)…` : "Queued: waiting for the nodes before this one…";
  if (note.kind === "running") return "Running: frames appear here as blocks finish…";
  if (note.kind === "failed") return note.on ? `Not run: ${note.on} failed before it (${note.error})` : `Error: ${note.error}`;
  if (note.kind === "interrupted") return note.started ? "Cancelled while this node was starting (before its first block)" : "Cancelled before this node ran";
  return "From the cache: ComfyUI reused an earlier run's outputs (same inputs) and this page has not seen its frames; change the seed or an input to stream again.";
}

/**
 * The last SWITCHES_SHOWN switches of a Stream as lines [{text, dropped}], oldest first: "block 4: a red
 * fox" for a landed one ("block 4 (blend 4): ..." blending over 4 blocks), "not used: a red fox (why)" with dropped true for one that could not land, led
 * by "… N earlier switches" when there were more.
 */
const landed = (w) => `block ${w.block}${w.blend ? ` (blend ${w.blend})` : ""}: ${w.text}`;

function switchLines(s) {
  const lines = s.switches.slice(-SWITCHES_SHOWN).map((w) => (w.dropped
    ? { text: `not used: ${w.text} (${w.dropped})`, dropped: true }
    : { text: landed(w), dropped: false }));
  const earlier = s.switchCount - lines.length;
  if (earlier > 0) lines.unshift({ text: `… ${earlier} earlier switch${earlier === 1 ? "" : "es"}`, dropped: false });
  return lines;
}

/**
 * The landed switches of a Stream as timeline ticks [{pos, text}], oldest first, `pos` in 0..1 along the
 * timeline: block / blocks for a finite run; for an endless one the timeline spans the latest
 * ENDLESS_TIMELINE_BLOCKS blocks (up to the newest block seen), and older switches fall off its left end.
 */
export function switchTicks(s) {
  if (!s) return [];
  const span = s.endless ? ENDLESS_TIMELINE_BLOCKS : s.blocks;
  const start = s.endless ? Math.max(0, s.newestBlock - ENDLESS_TIMELINE_BLOCKS + 1) : 0;
  return s.switches
    .filter((w) => w.block !== null && w.block >= start && w.block < start + span)
    .map((w) => ({ pos: (w.block - start) / span, text: landed(w) }));
}

/** A run of known length stopped by Cancel: where, and whether the video so far was saved. */
function stoppedAt(s) {
  const done = s.state ? s.state.doneBlocks : 0;
  const at = `Stopped by Cancel at block ${Math.min(done + 1, s.blocks)} of ${s.blocks}`;
  return done && s.video ? `${at}: the video so far is saved` : `${at}: no block was final yet, nothing to save`;
}

/**
 * Short status lines for a Stream (or null) and the node's note (Hub.note), shared by the widget and the
 * test harness: {status, stats, details (the stats explained, shown on hover), cascade, settings} strings, `switches` (the steered prompts, see
 * switchLines) and `ticks` (their timeline marks, see switchTicks).
 */
export function describe(s, note = null) {
  if (!s) return { status: noteText(note) || "No stream yet: queue the workflow to watch frames arrive here.", stats: "", details: "", cascade: "", settings: "", switches: [], ticks: [] };
  const f1 = (x) => x.toFixed(1);
  let status;
  if (s.status === "error") status = `Error: ${s.error}`;
  else if (s.stopped && !s.endless) status = stoppedAt(s);
  else if (s.stopped) status = `Stopped by Cancel after ${f1(s.seconds)} s${s.video ? ": the video is saved" : ""}`;
  else if (s.status === "done") status = s.received ? `Done in ${f1(s.seconds)} s` : `Done in ${f1(s.seconds)} s, no frames received`;
  else if (s.received) status = "Streaming";
  else status = s.compiling ? "Compiling (first run of this size; kept for the next)…" : "Waiting for the first frame…";
  if (s.joined && s.received) status += ` (joined during the run: from frame ${s.joinedFrom + 1})`;
  if (s.cached) status = `From the cache (same inputs): the last run's frames. ${status}`;
  status = noteText(note) || status;
  const total = s.framesTotal ? `/${s.framesTotal}` : "";
  const stats = [
    `${s.received}${total} frames${s.dropped ? ` (last ${s.frames.size} kept)` : ""}`,
    `${f1(s.genFps)} fps`,
    s.firstFrameAt === null ? "first frame –" : `first frame ${s.firstFrameAt.toFixed(2)} s`,
  ].join(" · ");
  const details = [ // on hover
    `generated at ${f1(s.genFps)} frames a second, played at ${s.fps}`,
    "first frame: seconds from the run's start to its first generated block",
    `${s.buffered} frames buffered ahead of the one shown`,
    ...(s.dropped ? [`only the last ${s.frames.size} frames are kept here (the saved video has them all)`] : []),
  ].join("\n");
  let cascade = "";
  if (s.endless) {
    const at = s.newestBlock >= 0 ? `block ${s.newestBlock} · ` : "";
    cascade = s.status === "running" ? `${at}endless: Cancel ends it and keeps the video`
      : `endless: ${s.state ? s.state.doneBlocks : 0} blocks done`;
  } else if (s.state) {
    const ticks = s.state.ticks ? `/${s.state.ticks}` : "";
    cascade = `tick ${s.state.tick}${ticks} · blocks done ${s.state.doneBlocks}/${s.blocks}`;
  }
  return { status, stats, details, cascade, settings: s.settings, switches: switchLines(s), ticks: switchTicks(s) };
}
