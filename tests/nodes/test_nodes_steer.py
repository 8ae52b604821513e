"""Steering the sampler node while it runs: POST /block_cascade/steer, the registry of running samplers,
the clip input and the block_cascade.switch event (stand-in comfy modules, tiny model, CPU).

What this proves: a text sent while the sampler runs is encoded by the graph's CLIP and switches at
the block the switch event reports, giving exactly the engine's run with that switch scheduled there;
the route answers 200/400/409 as documented (handler called with a stand-in request, aiohttp stood in);
the route is added to the server once; a sampler is registered only while it runs (also after an error
or a Cancel); a text the CLIP cannot encode is dropped and the run goes on; steering is refused
before any engine work where the engine cannot take it.
"""
from __future__ import annotations

import asyncio
import json
import sys
import types

import pytest
import torch
from test_nodes import (  # noqa: F401
    PKG,
    H,
    Recorder,
    W,
    config,
    fast_state_events,
    mm,
    model,
    no_engine,
    prompts,
    run,
    server_routes,
    stream_mod,
    values_mod,
)

from cascade_core.sampling.loop import CascadeConfig, PromptSchedule, generate
from cascade_core.video.latents import normalized_to_raw

steer_mod = sys.modules[f"{PKG}.nodes.steer"]


class FakeClip:
    """A core CLIP as far as the sampler uses it: texts -> CONDITIONING [[embeds [1, L, D], {}]] from a
    table; an unknown text raises as a broken encoder would. Counts the encodings."""

    def __init__(self, table: dict):
        self.table, self.encoded = table, []

    def tokenize(self, text):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens):
        text = tokens["text"]
        self.encoded.append(text)
        if text not in self.table:
            raise RuntimeError(f"no tokens for {text!r}")
        return [[self.table[text][None], {"pooled_output": None}]]


def sender_at(tick: int, body: dict, answers: list):
    """A Recorder hook that POSTs ``body`` (through the route's checks) after ``tick``'s state event."""
    def on_event(event, data):
        if event == "block_cascade.state" and data["tick"] == tick:
            answers.append(steer_mod.submit(body))
    return on_event


@pytest.mark.parametrize("blend", [0, 2])
def test_a_text_sent_while_the_sampler_runs_switches_at_the_reported_block(model, prompts, blend):
    """With blend_blocks (the widget's "blend" box), the switch blends as the engine's scheduled blend does."""
    e0, e1 = prompts[0][0][0][0], prompts[1][0][0][0]
    clip, answers, blocks = FakeClip({"a cat": e1}), [], 4
    settings = config(parallel=2, attention="causal")
    body = {"node": "12", "text": "a cat", **({"blend_blocks": blend} if blend else {})}
    with Recorder(sender_at(1, body, answers)) as rec:
        latent, _ = run("BlockCascadeSampler", unique_id="12", model=model, config=settings, width=W, height=H,
                        blocks=blocks, seed=4, positive=prompts[0], clip=clip)
    assert answers == [(200, {"queued": True})] and clip.encoded == ["a cat"]
    [(_, ev)] = rec.events("switch")
    (_, start), = rec.events("start")
    assert ev == {"node": "12", "run": start["run"], "block": ev["block"], "text": "a cat",
                  **({"blend_blocks": blend} if blend else {})} and ev["block"] > 0
    ref = generate(model.model, PromptSchedule([(0, e0), (ev["block"], e1)], {ev["block"]: blend}),
                   settings.cascade, blocks=blocks, width=W, height=H, seed=4)
    assert torch.equal(latent["samples"], normalized_to_raw(ref.latents.float()))
    assert steer_mod.submit({"node": "12", "text": "a cat"}) == (409, {"error": "node 12 is not running"})


def test_texts_are_encoded_once_and_one_that_cannot_be_encoded_is_dropped(prompts):
    e1 = prompts[1][0][0][0]
    clip, sent = FakeClip({"a cat": e1}), []
    live = steer_mod.Running("5", 3, clip, e1.shape[-1], lambda block, text, dropped, blend: sent.append((text, dropped)))
    for text, block, blend in (("a cat", None, 0), ("a cat", 2, 3), ("a dog", None, 0)):
        live.requests.put((text, block, blend))
    items = live.steer()
    assert [(b, torch.equal(e, e1), n) for b, e, n in items] == [(None, True, 0), (2, True, 3)]
    assert clip.encoded == ["a cat", "a dog"]  # "a cat" once
    assert len(sent) == 1 and sent[0][0] == "a dog" and "could not encode it: no tokens for 'a dog'" in sent[0][1]
    assert live.steer() == []


def test_the_route_answers_as_documented(monkeypatch):
    web = types.SimpleNamespace(json_response=lambda data, status=200: (status, data))
    monkeypatch.setitem(sys.modules, "aiohttp", types.SimpleNamespace(web=web))

    class Request:  # aiohttp's as far as the handler reads it: the announced length and the body's bytes
        def __init__(self, body, length=None):
            self.raw = b"not JSON {" if isinstance(body, Exception) else json.dumps(body).encode()
            self.content_length = len(self.raw) if length is None else length
            self.content = types.SimpleNamespace(read=self.read)

        async def read(self, n):  # as a stream: in pieces of at most 1000 bytes, then b"" at the end
            piece, self.raw = self.raw[:min(n, 1000)], self.raw[min(n, 1000):]
            return piece

    post = lambda body: asyncio.run(steer_mod.handle(Request(body)))  # noqa: E731
    assert post({"node": 99, "text": "a cat"}) == (409, {"error": "node 99 is not running"})
    blind = steer_mod.Running("98", 3, None, 32)
    steer_mod.register(blind)
    live = steer_mod.Running("99", 3, FakeClip({}), 32)
    steer_mod.register(live)
    try:
        assert post({"node": 98, "text": "a cat"}) == (400, {"error": steer_mod.NO_CLIP})
        for body, text in (({"node": 99, "text": "  "}, "text must be a non-empty string"),
                           ({"node": 99}, "text must be a non-empty string"),
                           ({"node": 99, "text": "a", "block": "2"}, "block must be an int >= 0"),
                           ({"node": 99, "text": "a", "block": True}, "block must be an int >= 0"),
                           ({"node": 99, "text": "a", "block": -1}, "block must be an int >= 0"),
                           ({"node": 99, "text": "a", "block": 3}, "block 3 is beyond the video (blocks 0..2)"),
                           ({"node": 99, "text": "a", "blend_blocks": -1}, "blend_blocks must be an int in 0..64"),
                           ({"node": 99, "text": "a", "blend_blocks": 65}, "blend_blocks must be an int in 0..64"),
                           ({"node": 99, "text": "a", "blend_blocks": "4"}, "blend_blocks must be an int in 0..64"),
                           ({"node": 99, "text": "a", "blend_blocks": 2.0}, "blend_blocks must be an int in 0..64"),
                           ({"node": 99, "text": "a", "blend_blocks": None}, "blend_blocks must be an int in 0..64"),
                           (ValueError("not JSON"), "the body must be a JSON object"),
                           (["a"], "the body must be a JSON object")):
            status, answer = post(body)
            assert status == 400 and text in answer["error"] and "\n" not in answer["error"], body
        assert post({"node": "99", "text": "a cat", "block": 2}) == (200, {"queued": True})
        assert post({"node": 99, "text": "a dog"}) == (200, {"queued": True})
        assert post({"node": 99, "text": "a cow", "blend_blocks": 4}) == (200, {"queued": True})
        assert [live.requests.get_nowait() for _ in range(3)] == [("a cat", 2, 0), ("a dog", None, 0),
                                                                  ("a cow", None, 4)]
        # bounded: a text, a body (announced or not), the queue
        status, answer = post({"node": 99, "text": "x" * (steer_mod.MAX_TEXT + 1)})
        assert status == 400 and f"at most {steer_mod.MAX_TEXT}" in answer["error"]
        huge = {"node": 99, "text": "a", "pad": "x" * steer_mod.MAX_BODY}
        assert asyncio.run(steer_mod.handle(Request(huge)))[0] == 413
        assert asyncio.run(steer_mod.handle(Request(huge, length=10)))[0] == 413  # a length header that lies
        for _ in range(steer_mod.MAX_WAITING):
            assert post({"node": 99, "text": "a cat"})[0] == 200
        status, answer = post({"node": 99, "text": "a cat"})
        assert status == 429 and "already wait" in answer["error"] and "\n" not in answer["error"]
    finally:
        steer_mod.unregister(blind)
        steer_mod.unregister(live)
    assert post({"node": 99, "text": "a cat"})[0] == 409


def test_the_route_is_added_to_the_server_once(server_routes, monkeypatch):
    import server

    assert steer_mod.register_route() and steer_mod.register_route()
    assert [(r.method, r.path, r.handler) for r in server_routes] == [("POST", "/block_cascade/steer",
                                                                        steer_mod.handle)]
    monkeypatch.setattr(server.PromptServer, "instance", None)
    assert not steer_mod.register_route()


@pytest.mark.parametrize("stop", ["error", "cancel"])
def test_a_sampler_is_registered_only_while_it_runs(model, prompts, stop, monkeypatch):
    answers = []
    real_on_tick = stream_mod.Reporter.on_tick

    def on_tick(reporter, ev):
        real_on_tick(reporter, ev)
        if ev.tick == 1:
            answers.append(steer_mod.submit({"node": "12", "text": "a cat"}))
            if stop == "cancel":
                mm.interrupt_current_processing(True)  # what POST /interrupt does
            else:
                raise RuntimeError("the widget's events failed")

    monkeypatch.setattr(stream_mod.Reporter, "on_tick", on_tick)
    with Recorder(), pytest.raises((RuntimeError, mm.InterruptProcessingException)):
        run("BlockCascadeSampler", unique_id="12", model=model, config=config(), width=W, height=H, blocks=3,
            seed=1, positive=prompts[0])
    assert answers == [(400, {"error": steer_mod.NO_CLIP})]  # registered while running, without a CLIP
    assert steer_mod.submit({"node": "12", "text": "a cat"})[0] == 409


def test_steering_is_refused_before_any_engine_work_where_it_cannot_run(model, prompts, no_engine):  # noqa: F811
    clip = FakeClip({})
    two = values_mod.Settings(cascade=CascadeConfig(frames_per_block=3), devices="cpu,cpu")
    (recache,) = run("BlockCascadePromptSchedule", conditioning=prompts[0], start_block=0, switch_mode="recache")
    for kw, text in ((dict(config=two, positive=prompts[0]), "runs on one device for now"),
                     (dict(config=config(parallel=3), schedule=recache), "needs parallel 1"),
                     (dict(config=config(), positive=prompts[0], clip=object()), "expected a core CLIP")):
        kw = {"clip": clip, **kw}
        with Recorder(), pytest.raises(ValueError, match=text) as err:
            run("BlockCascadeSampler", model=model, width=W, height=H, blocks=3, seed=0, **kw)
        assert str(err.value).startswith("clip: ") and "\n" not in str(err.value)


def test_an_hours_long_stream_keeps_a_bounded_number_of_texts_and_encodings(prompts):
    """Unique texts steered one after another: the encodings kept stay ENCODED at most (a text that comes
    back is encoded again), and each switch's text is forgotten once its event is told."""
    e1 = prompts[1][0][0][0]
    texts = [f"prompt {i}" for i in range(3 * steer_mod.ENCODED)]
    clip, sent = FakeClip({t: e1 for t in texts}), []
    live = steer_mod.Running("5", 0, clip, e1.shape[-1], lambda block, text, dropped, blend: sent.append((block, text)))
    for i, text in enumerate(texts):
        live.requests.put((text, None, 0))
        (item,) = live.steer()
        live.on_switch(types.SimpleNamespace(index=i, block=i + 1, dropped="", blend_blocks=0))
    assert len(live._encoded) == steer_mod.ENCODED and live.texts == {}
    assert sent == [(i + 1, t) for i, t in enumerate(texts)]
    live.requests.put((texts[0], None, 0))  # evicted long ago: encoded again
    live.steer()
    assert clip.encoded.count(texts[0]) == 2 and clip.encoded.count(texts[-1]) == 1
