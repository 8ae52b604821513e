// node --test web/tests/: the steer request of player_view.js, with a fake fetch-like `post`
import { test } from "node:test";
import assert from "node:assert/strict";
import { STEER_ROUTE, mjpegPath, steer } from "../player_view.js";

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
