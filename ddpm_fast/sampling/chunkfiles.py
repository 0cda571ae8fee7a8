"""The files of a ``sample_to_dir`` directory: one safetensors file per chunk, checked before it is used, and the
evaluation files assembled from them.

DIR/chunks/chunk_000123.safetensors holds chunk 123's images as "pixels", uint8 (b, H, W, C), with metadata:
the run manifest's digest, the chunk index, its first image index and the SHA-256 of the pixel bytes. Each is
written atomically (temp file + fsync + rename), so a killed process leaves at most a ``.tmp_*`` file, which the
next run removes. A chunk file is used only when it reads completely, belongs to this manifest, is the chunk its
name says, has the expected shape and matches its checksum; anything else is removed and redrawn.
DIR/samples.npz: "arr_0", uint8 (n, H, W, C), streamed from the chunk files in order (``images.save_uint8_npz``),
and "arr_1", the (n,) int64 class labels, for a run with labels.
"""
import hashlib
import os
import re

import numpy as np
import torch

from ..files import atomic_write, read_safetensors
from ..images import save_pngs, save_uint8_npz

FORMAT = "ddpm_fast.sample_chunk/1"
SUBDIR = "chunks"
SAMPLES = "samples.npz"
_NAME = re.compile(r"^chunk_(\d+)\.safetensors$")


class BadChunk(ValueError):
    """A chunk file that must not be used: the message says why."""


def chunk_name(k, n_chunks):
    return f"chunk_{k:0{max(6, len(str(n_chunks - 1)))}d}.safetensors"


def pixel_sha256(pixels):
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def write_chunk(path, pixels, digest, k, start, before_rename=None):
    """Writes chunk k (uint8 (b, H, W, C) pixels whose first image is image ``start``) atomically.
    before_rename(tmp): called once the temp file is complete, before it is made durable and renamed (the
    crash tests stop the process there)."""
    from safetensors.torch import save_file
    meta = {"format": FORMAT, "digest": f'"{digest}"', "chunk": str(k), "start": str(start),
            "sha256": f'"{pixel_sha256(pixels)}"'}
    tensor = torch.from_numpy(np.ascontiguousarray(pixels))

    def write(tmp):
        save_file({"pixels": tensor}, tmp, metadata=meta)
        if before_rename is not None:
            before_rename(tmp)
    atomic_write(path, write)


def read_chunk(path, digest, k, shape):
    """The pixels of chunk k, shape (b, H, W, C), from ``path``; BadChunk saying why it cannot be used."""
    try:
        tensors, meta = read_safetensors(path, (FORMAT,))
    except (ValueError, OSError) as err:
        raise BadChunk(f"unreadable ({err})") from None
    if meta.get("digest") != digest:
        raise BadChunk(f"belongs to another run (manifest digest {str(meta.get('digest'))[:12]}..., this run's "
                       f"is {digest[:12]}...)")
    if meta.get("chunk") != k:
        raise BadChunk(f"holds chunk {meta.get('chunk')}, not {k}")
    pixels = tensors.get("pixels")
    if pixels is None or pixels.dtype != torch.uint8 or tuple(pixels.shape) != tuple(shape):
        got = None if pixels is None else f"{pixels.dtype} {tuple(pixels.shape)}"
        raise BadChunk(f"holds pixels {got}, expected uint8 {tuple(shape)}")
    pixels = pixels.numpy()
    if pixel_sha256(pixels) != meta.get("sha256"):
        raise BadChunk("its pixels do not match their checksum (corrupt)")
    return pixels


def scan(directory, digest, shapes):
    """Checks every chunk file in DIR/chunks for a run whose chunk k has ``shapes[k]``; removes temp files and
    every chunk file that cannot be used. Returns (set of usable chunk indices, [(file name, why removed)])."""
    folder = os.path.join(directory, SUBDIR)
    os.makedirs(folder, exist_ok=True)
    done, removed = set(), []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        match = _NAME.match(name)
        if name.startswith(".tmp_"):
            why = "a temp file of an interrupted write"
        elif match is None:
            continue  # not ours: left alone
        else:
            k = int(match.group(1))
            if k >= len(shapes) or name != chunk_name(k, len(shapes)):
                why = f"not a chunk of this run ({len(shapes)} chunks)"
            else:
                try:
                    read_chunk(path, digest, k, shapes[k])
                    done.add(k)
                    continue
                except BadChunk as err:
                    why = str(err)
        os.remove(path)
        removed.append((name, why))
    return done, removed


def is_temp_png(name):
    """A temp file atomic_write leaves in png_dir when a run is killed while writing PNGs."""
    return name.startswith(".tmp_") and name.endswith(".png")


def remove_run_files(directory):
    """Removes what a run wrote into DIR (chunk files, temp files, samples.npz): --overwrite starts over."""
    folder = os.path.join(directory, SUBDIR)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if _NAME.match(name) or name.startswith(".tmp_"):
                os.remove(os.path.join(folder, name))
    if os.path.exists(os.path.join(directory, SAMPLES)):
        os.remove(os.path.join(directory, SAMPLES))


def assemble(directory, digest, chunks, shape, png_dir=None, labels=None):
    """DIR/samples.npz from every chunk file, in order, each checked again (and one PNG per image into png_dir).
    chunks: [(start, b)] of the run; shape: (C, H, W); labels: the run's (n,) class labels (arr_1), or None.
    Returns the .npz path."""
    n, (C, H, W) = sum(b for _, b in chunks), shape
    folder = os.path.join(directory, SUBDIR)
    if png_dir is not None:  # temp files of a run killed while writing PNGs: some FID tools would read them
        for name in filter(is_temp_png, os.listdir(png_dir)):
            os.remove(os.path.join(png_dir, name))

    def parts():
        for k, (start, b) in enumerate(chunks):
            path = os.path.join(folder, chunk_name(k, len(chunks)))
            try:
                pixels = read_chunk(path, digest, k, (b, H, W, C))
            except BadChunk as err:
                raise RuntimeError(f"{path} changed on disk after it was checked: {err}; run again to redraw "
                                   f"it") from None
            if png_dir is not None:
                save_pngs(pixels, png_dir, start, n)
            yield pixels
    path = save_uint8_npz(os.path.join(directory, SAMPLES), parts(), (n, H, W, C),
                          labels=None if labels is None else labels.numpy())
    if png_dir is not None:
        os.sync()  # the PNGs were renamed into place without an fsync each: make them durable at once
    return path
