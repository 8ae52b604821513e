"""Documented sampler rules re-implemented for the test oracles, apart from the engine's own code.

Each function follows a docstring of :mod:`cascade_core.sampling.loop` or :mod:`cascade_core.sampling.schedule`
(quoted below), so an oracle built on them catches a change of the engine that breaks its promise;
:func:`mjpeg_parts` reads the MJPEG stream as :mod:`nodes.mjpeg` documents it.
"""
import torch
import torch.nn.functional as F

MASK63 = 2 ** 63 - 1


def starting_noise(seed, shape):
    """``initial_noise``: one randn(shape) in float32 from a CPU generator seeded with ``seed``."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def noise_after_step(seed, block, step, shape):
    """``step_noise``: randn(shape) in float32 from a generator seeded with ``derived_seed``:
    x = seed*0x9E3779B97F4A7C15 + (block+1)*0xBF58476D1CE4E5B9 + (step+1)*0x94D049BB133111EB in exact
    integers, x ^= x >> 31, seed = x & (2**63 - 1)."""
    x = seed * 0x9E3779B97F4A7C15 + (block + 1) * 0xBF58476D1CE4E5B9 + (step + 1) * 0x94D049BB133111EB
    x ^= x >> 31
    return starting_noise(x & MASK63, shape)


def endless_block_noise(seed, block, shape):
    """``noise.block_noise`` (an endless run's initial noise of ``block``): :func:`noise_after_step` of
    step -1, i.e. randn(shape) from a generator seeded with ``derived_seed`` (seed, block, -1)."""
    return noise_after_step(seed, block, -1, shape)


def noise_levels(steps=(1000, 750, 500, 250), shift=5.0):
    """(timesteps, sigmas) of a warped step list: sigma(s) = shift*s / (1 + (shift-1)*s) on the float32
    table s = linspace(1, 0, 1001)[:-1], step st read at entry 1000 - st, t = 1000*sigma."""
    s = torch.linspace(1.0, 0.0, 1001)[:-1]
    table = shift * s / (1 + (shift - 1) * s)
    sigmas = [table[1000 - st] for st in steps]
    return [sig * 1000 for sig in sigmas], sigmas


def x0_from_velocity(x, v, sigma):
    """x0 = x_t - sigma*v in float64, back to float32."""
    return (x.double() - float(sigma.double()) * v.double()).float()


def renoised(x0, sigma, eps):
    """x = (1 - sigma)*x0 + sigma*eps in float32."""
    return ((1 - sigma) * x0 + sigma * eps).float()


def raw_noise_levels(steps, shift):
    """(timesteps, sigmas) of an unwarped step list: t = the step itself (float32), sigma = the table
    entry (sigma(s) = shift*s / (1 + (shift-1)*s) on s = linspace(1, 0, 1001)[:-1]) whose t = 1000*sigma
    lies nearest to it."""
    s = torch.linspace(1.0, 0.0, 1001)[:-1]
    table = shift * s / (1 + (shift - 1) * s)
    sigmas = [table[(table * 1000 - float(st)).abs().argmin()] for st in steps]
    return [torch.tensor(float(st)) for st in steps], sigmas


def rotate_frames(k, delta):
    """``WanModel.rope``'s rule for the time axis alone: of the c = head_dim/2 adjacent pairs
    (x[2j], x[2j+1]) of k [..., head_dim], the first c - 2*(c//3) (time) turn by delta*theta^(-2i/d)
    with d = 2*(c - 2*(c//3)), theta = 10000, i = the pair's index; the height/width pairs stay.
    Math in float64, k's dtype out: k RoPE'd at frame position p becomes k RoPE'd at p + delta."""
    c = k.shape[-1] // 2
    ct = c - 2 * (c // 3)
    angle = torch.zeros(c, dtype=torch.float64)
    angle[:ct] = delta * 10000.0 ** (-torch.arange(ct, dtype=torch.float64) * 2 / (2 * ct))
    x = k.double().unflatten(-1, (c, 2))
    re, im = x[..., 0], x[..., 1]
    turned = (re * angle.cos() - im * angle.sin(), re * angle.sin() + im * angle.cos())
    return torch.stack(turned, -1).flatten(-2).to(k.dtype)


def mjpeg_parts(body: bytes, boundary: bytes = b"frame") -> tuple[list[bytes], bool]:
    """``multipart/x-mixed-replace; boundary=frame`` bytes -> ([payload of each part], whether the closing
    delimiter ended them), checking that each part is ``Content-Type: image/jpeg`` with a
    ``Content-Length`` that is its payload's length (a body cut off mid-part raises AssertionError)."""
    parts, rest = [], body
    while rest.startswith(b"--" + boundary + b"\r\n"):
        head, _, rest = rest[len(boundary) + 4:].partition(b"\r\n\r\n")
        headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n"))
        assert headers[b"Content-Type"] == b"image/jpeg"
        n = int(headers[b"Content-Length"])
        parts.append(rest[:n])
        assert rest[n:n + 2] == b"\r\n"
        rest = rest[n + 2:]
    closed = rest == b"--" + boundary + b"--\r\n"
    assert closed or rest == b"", rest[:40]
    return parts, closed


# ---- attention over one full sequence with an explicit mask (independent of the KV pool) ----------

class MaskedAttention:
    def __init__(self, mask):
        self.mask = mask  # [L, L] bool, True = attend

    def __call__(self, layer, q, k, v):
        tr = lambda x: x.transpose(1, 2)  # [n, L, heads, hd] -> [n, heads, L, hd]
        return tr(F.scaled_dot_product_attention(tr(q), tr(k), tr(v), attn_mask=self.mask))


def frame_mask(block_of_frame, sees, tokens_per_frame):
    """Token mask from a frame-level rule sees(query_frame, key_frame), each frame ``tokens_per_frame`` tokens."""
    frames = len(block_of_frame)
    m = torch.tensor([[sees(fq, fk) for fk in range(frames)] for fq in range(frames)])
    tpf = tokens_per_frame
    return m.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)
