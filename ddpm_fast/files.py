"""Files written safely: ``atomic_write`` (temp file + fsync + rename, so a crash never leaves a half-written file
under the final name) and the safetensors reader/writer every ddpm_fast file format uses. The bottom floor."""
import json
import os
import tempfile
from typing import Callable, Dict, Tuple

import torch

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")  # the package's bundled files


def atomic_write(path: str, write: Callable[[str], None], fsync: bool = True) -> None:
    """Calls ``write(tmp)`` for a temp file in path's directory, fsyncs it, then renames it onto ``path``.

    A crash or exception at any point leaves ``path`` as it was (the old file, or none) and removes the temp.
    fsync=False skips the fsync (~4 ms per file here) for many small files that the caller makes durable at
    once with ``os.sync()``: the rename still keeps a killed process from leaving a partial file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix="_" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # the bytes reach the disk before the rename makes them the checkpoint
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_safetensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """Atomically writes CPU-contiguous copies of ``tensors`` with string ``metadata``. The same tensors and
    metadata always give the same bytes (see ``_sort_header``)."""
    from safetensors.torch import save_file
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp):
        save_file(flat, tmp, metadata=metadata)
        _sort_header(tmp)
    atomic_write(path, write)


def _sort_header(path: str) -> None:
    """Rewrites a safetensors file's JSON header with sorted keys. safetensors serialises the metadata from a
    hash map whose order changes from one process to the next, so two identical runs wrote different bytes. The
    data offsets are relative to the header's end, so only the header changes (in place: same length)."""
    with open(path, "rb+") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (n - len(text))
        if len(text) != n:  # cannot happen for safetensors' compact JSON; refuse rather than corrupt the file
            raise RuntimeError(f"{path}: unexpected safetensors header (length {n}, re-encoded {len(text)})")
        f.seek(8)
        f.write(text)


def read_safetensors(path: str, expect_format: Tuple[str, ...]) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors on the CPU, metadata with its JSON values parsed) of a ddpm_fast file of one of the formats."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(path, "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    fmt = meta.get("format")
    if fmt not in expect_format:
        raise ValueError(f"{path} has format {fmt!r}, expected one of {list(expect_format)} (a file written by "
                         f"ddpm_fast.save or ddpm_fast.train)")
    parsed = {"format": fmt}
    for key, value in meta.items():
        if key == "format":
            continue
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: metadata entry {key!r} is not valid JSON: {err}") from None
    return tensors, parsed
