// Block Cascade: a live player widget on every BlockCascadeSampler and BlockCascadeVideoToVideo node.
// Streamed frames come over the websocket as block_cascade.* events (see player_core.js).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { COMFY_EVENTS, EVENTS, Hub } from "./player_core.js";
import { createPlayerView } from "./player_view.js";

const NODE_TYPES = new Set(["BlockCascadeSampler", "BlockCascadeVideoToVideo"]); // the nodes that stream frames
const views = new Set();

function samplerNode(id) {
  const node = app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
  return node && NODE_TYPES.has(node.comfyClass) ? node : null;
}

// one Hub for the page; a node's stream is looked up by its current id at each frame, so a node
// whose id is assigned after creation (workflow load) still finds its events
const hub = new Hub({ accept: (id) => samplerNode(id) !== null });

let looping = false;
function loop(now) {
  for (const v of views) v.update(now);
  if (views.size) requestAnimationFrame(loop);
  else looping = false;
}
function ensureLoop() {
  if (!looping && views.size) {
    looping = true;
    requestAnimationFrame(loop);
  }
}

function attachPlayer(node) {
  const view = createPlayerView(document, () => hub.get(node.id), {
    getNote: () => hub.note(node.id),
    post: (path, init) => api.fetchApi(path, init), // steered prompts, through ComfyUI's server
    url: (path) => api.apiURL(path), // the MJPEG link and the saved video
  });
  views.add(view);
  ensureLoop();
  const widget = node.addDOMWidget("block_cascade_player", "block_cascade_player", view.element, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => 400, // the frames (at least 120 px), stats, cascade rows, controls, timeline, steer box
  });
  node.bcPlayerView = view;
  widget.onRemove = () => views.delete(view);
  // sized to its content (inputs, widgets and the player's least height), never narrower than 360 px
  const [w, h] = node.size;
  const [cw, ch] = node.computeSize?.() ?? [w, h];
  node.setSize([Math.max(w, cw, 360), Math.max(h, ch)]);
}

app.registerExtension({
  name: "block_cascade.player",
  setup() {
    for (const name of EVENTS) {
      api.addEventListener(name, (e) => {
        if (hub.handle(name, e.detail)) ensureLoop();
      });
    }
    // ComfyUI's own events: what a sampler waits for, and outputs answered from the cache
    const samplers = () => (app.graph?.nodes ?? []).filter((n) => NODE_TYPES.has(n.comfyClass)).map((n) => String(n.id));
    const title = (id) => {
      const n = app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
      return n ? `“${n.title || n.type}”` : `node ${id}`;
    };
    for (const name of COMFY_EVENTS) {
      api.addEventListener(name, (e) => {
        if (hub.comfy(name, e.detail, { samplers: samplers(), title })) ensureLoop();
      });
    }
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData?.name)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created?.apply(this, arguments);
      attachPlayer(this);
      return r;
    };
    const removed = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      hub.forget(this.id);
      views.delete(this.bcPlayerView);
      return removed?.apply(this, arguments);
    };
  },
});
