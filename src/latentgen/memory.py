"""The memory guard: a job's peak memory estimated from its shape before any latent is allocated, and refused
with one line when it cannot fit in the memory available on its device.

The estimate counts the activations that live at once (the weights are already loaded and so already outside the
available memory): the UNet's skip connections of every level plus the working set of its largest level (a
transformer level holds q, k, v and GEGLU's 8×-wide projection; attention runs through scaled_dot_product_attention's
fused kernels, which never hold the full attention matrix), for the batch doubled by classifier-free guidance; the
first stage's largest level at the resolution it runs at (a tile of `tile` latent pixels above that size, as
pipelines tiles); the float32 latents and output images; and a fixed overhead. UNet and first stage run one after
the other, but both count: the allocator does not hand the UNet's freed memory back whole (measured). The factors
were fitted to peaks measured on CPU (tiny models, 128-512 px: the estimate came out 1.3-2× the measured peak, more
for the smallest jobs, where the fixed overhead dominates); tests/test_memory.py holds the estimate between 1× and
2.5× of a measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

# Live tensors in units of a level's activation (channels × pixels), measured on CPU (tests/test_memory.py):
RES_WORK = 10  # a ResBlock: norm, SiLU, two convolutions, the sum, and oneDNN's reordered copies
ATTN_WORK = 24  # a SpatialTransformer block: norm, q, k, v, out and the feed-forward's GEGLU (8× wide)
FIRST_STAGE_WORK = 10  # an autoencoder ResBlock / upsampling at its level
TILED_WORK = 2  # tiled first stage: the statistics preview pass and the tiles' leftovers, in units of one tile
OVERHEAD = 96 * 2**20  # allocator and kernel scratch, whatever the job
SAMPLER_LATENTS = 10  # latent-sized float32 tensors a sampler keeps (x, denoised, history, noise, ...)
IMAGE_COPIES = 5  # image-sized float32 tensors around decoding (tile blend sum and weight, scale, clamp)
HEADROOM = 0.9  # refuse above this share of the available memory


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass
class Estimate:
    unet: int
    first_stage: int
    buffers: int
    upcast: int = 0  # weights upcast as their layers run: see upcast_working_set

    @property
    def total(self) -> int:
        return self.unet + self.first_stage + self.buffers + self.upcast + OVERHEAD


def upcast_working_set(module, elem: int) -> int:
    """Bytes of the largest weight that `module` upcasts (or dequantises) as its layer runs, three times over: the
    `elem`-byte copy and, for a convolution, its oneDNN copy and the packed reorder of it (0 without such
    weights; their stored bytes are already loaded, like every weight)."""
    from torch.nn.utils import parametrize

    sizes = [
        m.parametrizations[name].original.numel()
        for m in module.modules()
        if parametrize.is_parametrized(m)
        for name in m.parametrizations
    ]
    return 3 * elem * max(sizes, default=0)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def unet_activations(unet, batch: int, h: int, w: int, elem: int) -> int:
    """Bytes of UNet activations alive at once for a batch of latents h × w (UNetConfig `unet`)."""
    skips = work = 0
    for level, mult in enumerate(unet.channel_mult):
        c = unet.model_channels * mult
        px = _ceil_div(h, 2**level) * _ceil_div(w, 2**level)
        skips += (unet.num_res_blocks + 1) * c * px
        attn = 2**level in unet.attention_resolutions
        work = max(work, (ATTN_WORK * unet.depth(level) if attn else RES_WORK) * c * px)
    return batch * elem * (skips + work)


def first_stage_activations(fs, n: int, height: int, width: int, elem: int, tile: int) -> int:
    """Bytes of the decoder's (or encoder's) largest level for n images of height × width pixels, in tiles of
    `tile` latent pixels above that size."""
    side = tile * fs.factor
    tiled = max(height, width) > side
    if tiled:  # one tile at a time
        height, width = min(height, side), min(width, side)
    peak = 0
    for level, mult in enumerate(fs.ch_mult):
        px = _ceil_div(height, 2**level) * _ceil_div(width, 2**level)
        peak = max(peak, FIRST_STAGE_WORK * fs.ch * mult * px)
    return n * elem * peak * (TILED_WORK if tiled else 1)


def estimate(config, n: int, width: int, height: int, elem: int, *, tile: int, guided: bool = True) -> Estimate:
    """Peak bytes of one generation job: n images of width × height with model `config` (a ModelConfig) whose
    networks compute with `elem`-byte floats; first stage in tiles of `tile` latent pixels above that size;
    `guided`: classifier-free guidance doubles the UNet batch."""
    f = config.factor
    h, w = height // f, width // f
    unet = unet_activations(config.unet, n * (2 if guided else 1), h, w, elem)
    fs = first_stage_activations(config.first_stage, n, height, width, elem, tile)
    buffers = 4 * (SAMPLER_LATENTS * n * config.latent_channels * h * w + IMAGE_COPIES * n * 3 * height * width)
    return Estimate(unet, fs, buffers)


def available_memory(device=None) -> int | None:
    """Bytes available to new allocations on `device` (a torch.device or string; None: the CPU): free CUDA
    memory plus what torch's caching allocator holds unused; else Linux MemAvailable, capped by the cgroup's
    limit. None where unknown."""
    kind = getattr(device, "type", str(device or "cpu")).split(":")[0]
    if kind == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
        if limit != "max":
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def check_fits(
    config, n: int, width: int, height: int, elem: int, *, tile: int, device=None, guided: bool = True, upcast: int = 0
) -> Estimate:
    """Refuse a job whose estimated peak (with `upcast` bytes of weights upcast as they run) exceeds HEADROOM of
    the available memory (InputError, one line)."""
    est = estimate(config, n, width, height, elem, tile=tile, guided=guided)
    est.upcast = upcast
    avail = available_memory(device)
    if avail is not None and est.total > HEADROOM * avail:
        raise InputError(
            f"{n} image{'s' if n > 1 else ''} of {width}x{height} need about {gib(est.total)} of memory but "
            f"{gib(avail)} is available: use a smaller --width/--height or --num"
        )
    return est
