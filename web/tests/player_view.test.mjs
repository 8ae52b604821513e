// node --test web/tests/: the steer request of player_view.js, with a fake fetch-like `post`
import { test } from "node:test";
import assert from "node:assert/strict";
import { MAX_BLEND, STEER_ROUTE, mjpegPath, steer, videoPath } from "../player_view.js";

/** A fake `post` answering `status` with `body` (an object sent as JSON, or a string that is not JSON). */
function fake(status, body) {
  const calls = [];
  const post = async (path, init) => {
    calls.push({ path, init });
    return { status, json: async () => (typeof body === "string" ? JSON.parse(body) : body) };
  };
  return { post, calls };
}

test("a typed prompt is POSTed as JSON {node, text} to the steer route", async () => {
  const { post, calls } = fake(200, { queued: true });
  assert.equal(await steer(post, "7", "a red fox"), "", "queued: no error");
  assert.equal(calls.length, 1);
  assert.equal(calls[0].path, "/block_cascade/steer");
  assert.equal(STEER_ROUTE, "/block_cascade/steer");
  assert.equal(calls[0].init.method, "POST");
  assert.equal(calls[0].init.headers["Content-Type"], "application/json");
  assert.deepEqual(JSON.parse(calls[0].init.body), { node: "7", text: "a red fox" });
  // a numeric node id goes out as the id ComfyUI's events carry; the text is sent as typed
  await steer(post, 12, "  snow, then night ");
  assert.deepEqual(JSON.parse(calls[1].init.body), { node: "12", text: "  snow, then night " });
});

test("a blank prompt sends nothing", async () => {
  const { post, calls } = fake(200, { queued: true });
  assert.equal(await steer(post, "7", ""), null);
  assert.equal(await steer(post, "7", "  \t"), null);
  assert.equal(calls.length, 0);
});

test("refusals show the server's one-line error, else the HTTP status or why it was not sent", async () => {
  assert.equal(await steer(fake(409, { error: "node 7 is not running" }).post, "7", "x"), "node 7 is not running");
  assert.equal(await steer(fake(400, { error: "connect a CLIP\nto the sampler" }).post, "7", "x"), "connect a CLIP");
  assert.equal(await steer(fake(404, "<html>not found</html>").post, "7", "x"), "refused: HTTP 404");
  assert.equal(await steer(fake(500, { detail: 1 }).post, "7", "x"), "refused: HTTP 500");
  const down = async () => {
    throw new TypeError("Failed to fetch");
  };
  assert.equal(await steer(down, "7", "x"), "not sent: Failed to fetch");
});

test("the MJPEG link points at the stream route of the node", () => {
  assert.equal(mjpegPath("7"), "/block_cascade/stream/7.mjpeg");
  assert.equal(mjpegPath(12), "/block_cascade/stream/12.mjpeg");
  assert.equal(mjpegPath("5:3"), "/block_cascade/stream/5%3A3.mjpeg"); // a subgraph node id, kept in one path segment
});

test("an \"at block\" number goes out as \"block\"; empty means the next block; a bad one is not sent", async () => {
  const { post, calls } = fake(200, { queued: true });
  assert.equal(await steer(post, "7", "a red fox", "5"), "");
  assert.deepEqual(JSON.parse(calls[0].init.body), { node: "7", text: "a red fox", block: 5 });
  assert.equal(await steer(post, "7", "snow", 0), "");
  assert.deepEqual(JSON.parse(calls[1].init.body), { node: "7", text: "snow", block: 0 });
  for (const empty of ["", "  ", null, undefined]) await steer(post, "7", "night", empty);
  for (const c of calls.slice(2)) assert.deepEqual(JSON.parse(c.init.body), { node: "7", text: "night" });
  const sent = calls.length;
  for (const bad of ["-1", "2.5", "x", -3]) {
    assert.match(await steer(post, "7", "rain", bad), /^not sent: "at block" must be a whole number >= 0, got /);
  }
  assert.equal(calls.length, sent, "nothing sent for a bad block");
});

test("a \"blend\" number goes out as \"blend_blocks\"; empty or 0 is a hard switch; a bad one is not sent", async () => {
  const { post, calls } = fake(200, { queued: true });
  assert.equal(MAX_BLEND, 64, "the route's bound (cascade_core/sampling/blend.py)");
  assert.equal(await steer(post, "7", "a red fox", "", "4"), "");
  assert.deepEqual(JSON.parse(calls[0].init.body), { node: "7", text: "a red fox", blend_blocks: 4 });
  assert.equal(await steer(post, "7", "snow", 3, 64), "");
  assert.deepEqual(JSON.parse(calls[1].init.body), { node: "7", text: "snow", block: 3, blend_blocks: 64 });
  for (const hard of ["", " ", null, undefined, "0", 0]) await steer(post, "7", "night", null, hard);
  for (const c of calls.slice(2)) assert.deepEqual(JSON.parse(c.init.body), { node: "7", text: "night" });
  const sent = calls.length;
  for (const bad of ["-1", "2.5", "x", 65, "1e3"]) {
    assert.match(await steer(post, "7", "rain", null, bad), /^not sent: "blend" must be a whole number 0\.\.64, got /);
  }
  assert.equal(calls.length, sent, "nothing sent for a bad blend");
});

test("a saved video is linked through ComfyUI's /view route", () => {
  const q = new URL("http://h" + videoPath({ filename: "bc 1.mp4", subfolder: "runs/a", type: "output" }));
  assert.equal(q.pathname, "/view");
  assert.deepEqual(Object.fromEntries(q.searchParams), { filename: "bc 1.mp4", subfolder: "runs/a", type: "output" });
  assert.equal(new URL("http://h" + videoPath({ filename: "a&b.mp4" })).searchParams.get("filename"), "a&b.mp4");
});
