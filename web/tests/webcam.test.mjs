// node --test web/tests/: the webcam sender of webcam.js with a fake camera, canvas, clock and `post`
import { test } from "node:test";
import assert from "node:assert/strict";
import { JPEG_QUALITY, WEBCAM_ROUTE, WebcamSender, coverCrop, createWebcamButton, readsWebcam, webcamPath } from "../webcam.js";

const flush = () => new Promise((r) => setTimeout(r, 0)); // let pending promise callbacks run

/** A fake browser: a camera whose tracks record stop(), a canvas whose toBlob answers a blob, a manual clock
 * and timers, and a `post` whose answers the test releases one by one (or at once with `auto`). */
function fakeBrowser({ auto = null, camera = { w: 640, h: 480 }, deny = null, fps = 10 } = {}) {
  const b = { t: 0, timers: [], posts: [], draws: [], tracks: [], asked: [], canvases: [], changes: 0 };
  b.getUserMedia = (constraints) => {
    b.asked.push(constraints);
    if (deny) return Promise.reject(deny);
    const tracks = [{ stopped: false, stop() { this.stopped = true; } }];
    b.tracks.push(...tracks);
    return b.gate ? b.gate.then(() => ({ getTracks: () => tracks })) : Promise.resolve({ getTracks: () => tracks });
  };
  b.makeVideo = () => ({ videoWidth: camera.w, videoHeight: camera.h, play: async () => {}, pause() { this.paused = true; } });
  b.makeCanvas = (width, height) => {
    const c = {
      width, height,
      getContext: () => ({ drawImage: (...args) => b.draws.push({ args, size: [c.width, c.height] }) }),
      toBlob: (cb, type, quality) => setTimeout(() => cb({ blob: b.draws.length, type, quality }), 0), // a task, as in browsers
    };
    b.canvases.push(c);
    return c;
  };
  b.post = (path, init) => new Promise((resolve, reject) => {
    const p = { path, init, at: b.t, answer: (status, body) => resolve({ status, json: async () => body }), fail: reject };
    b.posts.push(p);
    if (auto) p.answer(...auto(p));
  });
  b.sender = new WebcamSender({
    post: b.post, getUserMedia: b.getUserMedia, makeVideo: b.makeVideo, makeCanvas: b.makeCanvas, fps,
    now: () => b.t, schedule: (fn, ms) => { const h = { fn, at: b.t + ms }; b.timers.push(h); return h; },
    cancel: (h) => { b.timers = b.timers.filter((x) => x !== h); }, onChange: () => b.changes++,
  });
  /** Advance the clock to `t` ms, running due timers in order and letting promises settle after each. */
  b.advance = async (t) => {
    for (;;) {
      await flush();
      b.timers.sort((x, y) => x.at - y.at);
      const due = b.timers[0];
      if (!due || due.at > t) break;
      b.timers.shift();
      b.t = due.at;
      due.fn();
    }
    b.t = t;
    await flush();
  };
  return b;
}

test("paths and the cover crop", () => {
  assert.equal(WEBCAM_ROUTE, "/block_cascade/webcam");
  assert.equal(webcamPath("7", "r1"), "/block_cascade/webcam/7?run=r1");
  assert.equal(webcamPath("5:3", "a b"), "/block_cascade/webcam/5%3A3?run=a%20b"); // a subgraph id in one segment
  assert.deepEqual(coverCrop(640, 480, 832, 480), [0, 55.38461538461539, 640, 369.2307692307692]); // wider canvas
  assert.deepEqual(coverCrop(640, 480, 240, 240), [80, 0, 480, 480]); // a square one: the middle
  assert.deepEqual(coverCrop(640, 480, 320, 240), [0, 0, 640, 480]); // same aspect: all of it
});

test("start asks for the camera and posts JPEG frames of the canvas to the run's route", async () => {
  const b = fakeBrowser({ auto: () => [200, { taken: true, width: 832, height: 480, dropped: 0 }] });
  await b.sender.start("7", "r1", 320, 185);
  assert.deepEqual(b.asked, [{ video: { width: { ideal: 320 }, height: { ideal: 185 } }, audio: false }]);
  assert.equal(b.sender.state, "on");
  await b.advance(0);
  assert.equal(b.posts.length, 1);
  const [p] = b.posts;
  assert.equal(p.path, "/block_cascade/webcam/7?run=r1");
  assert.equal(p.init.method, "POST");
  assert.equal(p.init.headers["Content-Type"], "image/jpeg");
  assert.deepEqual(p.init.body, { blob: 1, type: "image/jpeg", quality: JPEG_QUALITY });
  assert.deepEqual(b.draws[0].args.slice(1), [...coverCrop(640, 480, 320, 185), 0, 0, 320, 185]);
  // the answer's size (the run's) becomes the canvas's: later frames are drawn at 832 x 480
  await b.advance(100);
  assert.deepEqual(b.draws[1].size, [832, 480]);
  assert.deepEqual(b.draws[1].args.slice(1), [...coverCrop(640, 480, 832, 480), 0, 0, 832, 480]);
  assert.equal(b.sender.sent, 2);
});

test("at most one request in flight and at most fps frames a second", async () => {
  const b = fakeBrowser({ fps: 10 });
  await b.sender.start("7", "r1", 64, 32);
  await b.advance(500); // the server does not answer: nothing more is posted
  assert.equal(b.posts.length, 1);
  b.posts[0].answer(200, { taken: true, width: 64, height: 32, dropped: 0 });
  await b.advance(500);
  assert.equal(b.posts.length, 2, "the next frame right after the answer (the interval has passed)");
  b.posts[1].answer(200, { taken: true, width: 64, height: 32, dropped: 0 });
  await b.advance(530);
  assert.equal(b.posts.length, 2, "an interval (100 ms) after the last frame, not sooner");
  await b.advance(600);
  assert.equal(b.posts.length, 3);
  assert.equal(b.posts[2].at, 600);
  // answered at once, for 2 s: 10 frames a second
  const fast = fakeBrowser({ fps: 10, auto: () => [200, { taken: true, width: 64, height: 32, dropped: 3 }] });
  await fast.sender.start("7", "r1", 64, 32);
  await fast.advance(1999);
  assert.equal(fast.posts.length, 20);
  assert.ok(fast.posts.every((p, i) => i === 0 || p.at - fast.posts[i - 1].at >= 100));
  assert.equal(fast.sender.dropped, 3, "the server's count of frames it dropped");
});

test("a refusal stops the camera with the server's one line; 429 only waits", async () => {
  const b = fakeBrowser({ fps: 10 });
  await b.sender.start("7", "r1", 64, 32);
  await b.advance(0);
  b.posts[0].answer(429, { error: "2 frames of node 7 are being decoded; post one at a time" });
  await b.advance(100);
  assert.equal(b.sender.state, "on");
  assert.equal(b.posts.length, 2);
  b.posts[1].answer(409, { error: "node 7 is running another run (r2), not r1; start\nagain" });
  await b.advance(1000);
  assert.equal(b.sender.state, "off");
  assert.equal(b.sender.error, "webcam: node 7 is running another run (r2), not r1; start");
  assert.ok(b.tracks.every((t) => t.stopped), "the camera's tracks are stopped");
  assert.equal(b.posts.length, 2);
  assert.equal(b.timers.length, 0);
  // not JSON, or the request failed
  const c = fakeBrowser({ auto: () => [404, "<html>"] });
  c.post = async () => ({ status: 404, json: async () => { throw new SyntaxError("not JSON"); } });
  c.sender.post = c.post;
  await c.sender.start("7", "r1", 64, 32);
  await c.advance(10);
  assert.equal(c.sender.error, "webcam: refused: HTTP 404");
  const d = fakeBrowser();
  d.sender.post = async () => { throw new TypeError("Failed to fetch"); };
  await d.sender.start("7", "r1", 64, 32);
  await d.advance(10);
  assert.equal(d.sender.error, "webcam: not sent: Failed to fetch");
  assert.ok(d.tracks.every((t) => t.stopped));
});

test("stop while a frame is on its way stops the tracks and ignores the answer", async () => {
  const b = fakeBrowser();
  await b.sender.start("7", "r1", 64, 32);
  await b.advance(0);
  b.sender.stop();
  assert.ok(b.tracks.length === 1 && b.tracks[0].stopped);
  b.posts[0].answer(200, { taken: true, width: 64, height: 32, dropped: 0 });
  await b.advance(2000);
  assert.equal(b.posts.length, 1);
  assert.equal(b.sender.sent, 0);
  assert.equal(b.sender.state, "off");
});

test("stop while the browser asks for the camera: its tracks stop as soon as it is given", async () => {
  const b = fakeBrowser();
  let open;
  b.gate = new Promise((r) => { open = r; });
  const started = b.sender.start("7", "r1", 64, 32);
  assert.equal(b.sender.state, "starting");
  b.sender.stop();
  open();
  await started;
  assert.equal(b.tracks.length, 1);
  assert.ok(b.tracks[0].stopped);
  assert.equal(b.sender.state, "off");
  await b.advance(1000);
  assert.equal(b.posts.length, 0);
});

test("a camera the browser refuses is one line", async () => {
  const e = Object.assign(new Error("Permission denied"), { name: "NotAllowedError" });
  const b = fakeBrowser({ deny: e });
  await b.sender.start("7", "r1", 64, 32);
  assert.equal(b.sender.state, "off");
  assert.equal(b.sender.error, "webcam: Permission denied");
  assert.ok(b.changes >= 2);
});

class FakeEl {
  constructor(tag) { Object.assign(this, { tag, children: [], textContent: "", title: "", className: "", disabled: false, style: {} }); }
  append(...els) { this.children.push(...els); }
}

test("the button starts the camera for the running stream and Cancel (the run's end) stops it", async () => {
  const b = fakeBrowser({ auto: () => [200, { taken: true, width: 64, height: 32, dropped: 0 }] });
  const doc = { createElement: (tag) => new FakeEl(tag) };
  const w = createWebcamButton(doc, {
    post: b.post, mediaDevices: { getUserMedia: b.getUserMedia }, makeVideo: b.makeVideo, makeCanvas: b.makeCanvas,
    now: () => b.t, fps: 10,
    schedule: (fn, ms) => { const h = { fn, at: b.t + ms }; b.timers.push(h); return h; },
    cancel: (h) => { b.timers = b.timers.filter((x) => x !== h); },
  });
  const [button, note] = w.element.children.filter((e) => typeof e !== "string");
  assert.equal(button.disabled, false);
  const stream = { node: "7", run: "r1", status: "running", width: 320, height: 180, liveInput: "webcam" };
  w.update(stream);
  assert.equal(w.element.style.display, "");
  assert.equal(button.textContent, "webcam");
  button.onclick();
  await b.advance(250);
  assert.equal(w.sender.state, "on");
  assert.equal(button.textContent, "■ stop webcam");
  assert.equal(b.posts[0].path, "/block_cascade/webcam/7?run=r1");
  assert.match(note.textContent, /^\d+ sent$/);
  w.update({ ...stream }); // the same run, a new object: still on
  assert.equal(w.sender.state, "on");
  w.update({ ...stream, status: "error" }); // Cancel: the run ends
  assert.equal(w.sender.state, "off");
  assert.ok(b.tracks.every((t) => t.stopped));
  assert.equal(button.textContent, "webcam");
  // another run shown, and the button pressed again, each stop it too
  w.update(stream);
  button.onclick();
  await b.advance(300);
  w.update({ ...stream, run: "r2" });
  assert.equal(w.sender.state, "off");
  w.update(stream);
  button.onclick();
  await b.advance(350);
  assert.equal(w.sender.state, "on");
  button.onclick();
  assert.equal(w.sender.state, "off");
  assert.equal(b.tracks.length, 3);
  assert.ok(b.tracks.every((t) => t.stopped));
  // no run shown: the button starts nothing
  w.update(null);
  button.onclick();
  await b.advance(400);
  assert.equal(w.sender.state, "off");
  assert.equal(b.tracks.length, 3);
});

test("a page without cameras (http:// other than localhost) gets a disabled button saying why", () => {
  const w = createWebcamButton({ createElement: (tag) => new FakeEl(tag) }, { post: async () => null, mediaDevices: undefined });
  const [button] = w.element.children.filter((e) => typeof e !== "string");
  assert.equal(button.disabled, true);
  assert.match(button.title, /https:\/\/ pages and http:\/\/localhost only/);
});

test("the button shows only for a running run that reads the webcam, and starts nothing for another", async () => {
  const b = fakeBrowser({ auto: () => [200, { taken: true, width: 64, height: 32, dropped: 0 }] });
  const w = createWebcamButton({ createElement: (tag) => new FakeEl(tag) }, {
    post: b.post, mediaDevices: { getUserMedia: b.getUserMedia }, makeVideo: b.makeVideo, makeCanvas: b.makeCanvas,
    now: () => b.t, schedule: (fn, ms) => { const h = { fn, at: b.t + ms }; b.timers.push(h); return h; },
    cancel: (h) => { b.timers = b.timers.filter((x) => x !== h); },
  });
  const [button] = w.element.children.filter((e) => typeof e !== "string");
  const running = { node: "7", run: "r1", status: "running", width: 64, height: 32 };
  for (const s of [null, running, { ...running, liveInput: "" }, { ...running, liveInput: "mjpeg" },
    { ...running, liveInput: "webcam", status: "done" }]) {
    w.update(s); // a sampler, an IMAGE or MJPEG input, a finished webcam run: no button, and a click starts nothing
    assert.equal(w.element.style.display, "none");
    button.onclick();
    await b.advance(100);
    assert.equal(w.sender.state, "off");
    assert.equal(b.tracks.length, 0);
  }
  w.update({ ...running, liveInput: "webcam" });
  assert.equal(w.element.style.display, "");
  assert.ok(readsWebcam({ ...running, liveInput: "webcam" }) && !readsWebcam(running) && !readsWebcam(null));
});
