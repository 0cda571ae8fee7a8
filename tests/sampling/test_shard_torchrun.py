"""sample_to_dir under torchrun on the CPU (gloo, one thread per process): 2 and 3 processes write the samples.npz
of a single process byte for byte, also after a rank is SIGKILLed, after Ctrl-C (SIGINT to all) and after a
kill in the middle of writing a chunk; ranks that disagree, and a directory holding another run, are refused on
every rank. The faults are triggered by the test-only hook DDPM_FAST_TEST_FAULT (sampling/shard.py), never by
timing."""
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast import UNet
from ddpm_fast.cli import main
from ddpm_fast.images import to_uint8

from clirun import torchrun

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

N, BATCH, STEPS = 11, 3, 3  # 4 chunks: 3, 3, 3, 2 images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model file, a seed, and what every run must write: sample() of the same settings as uint8 NHWC,
    computed here on one thread, like every torchrun process."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("shard")
    model_file = str(folder / "tiny.safetensors")
    ddpm_fast.save(UNet.preset("tiny", ch_mult=(1, 2)), model_file)
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = to_uint8(ddpm_fast.sample(ddpm_fast.load(model_file), N, STEPS, seed=seed, batch_size=BATCH,
                                         progress=False))
    finally:
        torch.set_num_threads(before)
    return model_file, seed, want


def sample_args(setup, out_dir):
    model_file, seed, _ = setup
    return ["sample", "--checkpoint", model_file, "-n", str(N), "--steps", str(STEPS), "--seed", str(seed),
            "--device", "cpu", "--batch-size", str(BATCH), "--out-dir", str(out_dir), "--no-progress"]


def arr0(path):
    with np.load(path) as data:
        assert data.files == ["arr_0"]
        return data["arr_0"]


def found_on_disk(text):
    return int(re.search(r"(\d+) found on disk", text).group(1))


SCRIPT = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    model_file, out, seed, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    import ddpm_fast
    from ddpm_fast.cli import main
    model, errors = ddpm_fast.load(model_file), {}
    try:  # rank 1 with another seed: every rank refuses, before any chunk is drawn
        ddpm_fast.sample_to_dir(model, 11, out + "/disagree", steps=3, seed=seed + rank, batch_size=3,
                                progress=False)
    except ValueError as err:
        errors["disagree"] = str(err)
    rc = main(args)  # the command line, in the caller's process group
    try:  # other steps in the finished directory: rank 0 finds out, every rank raises
        ddpm_fast.sample_to_dir(model, 11, out + "/run", steps=4, seed=seed, batch_size=3, progress=False)
    except ValueError as err:
        errors["other"] = str(err)
    json.dump({"rank": rank, "rc": rc, "errors": errors}, open(f"{out}/rank{rank}.json", "w"))
    dist.destroy_process_group()
''')


def test_two_processes_write_one_process_bytes_and_refuse_together(setup, tmp_path):
    model_file, seed, want = setup
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    done = torchrun(2, [str(script), model_file, str(tmp_path), str(seed), *sample_args(setup, tmp_path / "run")],
                    tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "11 images in" in done.stdout and "drawn by 2 process(es)" in done.stdout
    np.testing.assert_array_equal(arr0(tmp_path / "run" / "samples.npz"), want)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["rc"] == 0
        assert f"rank 1 would draw other images than rank 0 (seed: {seed} on rank 0, {seed + 1} on rank 1)" in \
            result["errors"]["disagree"]
        assert "holds a run with other settings: steps: 3 in the directory, 4 now" in result["errors"]["other"]
    assert os.listdir(tmp_path / "disagree") == []  # refused before any work
    single = tmp_path / "single"  # one process, in this one (one thread): the same bytes
    assert main(sample_args(setup, single)) == 0
    assert arr0(single / "samples.npz").tobytes() == arr0(tmp_path / "run" / "samples.npz").tobytes()


def test_three_processes_n_not_a_multiple_of_the_batch(setup, tmp_path):
    done = torchrun(3, ["-m", "ddpm_fast", *sample_args(setup, tmp_path / "run")], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "11 drawn now, 0 found on disk" in done.stdout and "rank 2:" in done.stdout
    np.testing.assert_array_equal(arr0(tmp_path / "run" / "samples.npz"), setup[2])


def test_sigkill_of_one_rank_then_resume_on_three(setup, tmp_path):
    run = tmp_path / "run"
    killed = torchrun(2, ["-m", "ddpm_fast", *sample_args(setup, run)], tmp_path, fault="1:1:kill-after")
    assert killed.returncode != 0 and not (run / "samples.npz").exists()
    assert "chunk_000001.safetensors" in os.listdir(run / "chunks")  # rank 1 died right after writing it
    resumed = torchrun(3, ["-m", "ddpm_fast", *sample_args(setup, run)], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert found_on_disk(resumed.stdout) >= 3
    np.testing.assert_array_equal(arr0(run / "samples.npz"), setup[2])


def test_sigint_to_all_then_resume_in_one_process(setup, tmp_path, capsys):
    run = tmp_path / "run"
    stopped = torchrun(2, ["-m", "ddpm_fast", *sample_args(setup, run)], tmp_path, fault="0:0:interrupt")
    assert stopped.returncode != 0 and not (run / "samples.npz").exists()
    assert "chunk_000000.safetensors" in os.listdir(run / "chunks")
    assert not [f for f in os.listdir(run / "chunks") if not f.startswith(("chunk_", ".tmp_"))]
    assert main(sample_args(setup, run)) == 0
    assert found_on_disk(capsys.readouterr().out) >= 3
    np.testing.assert_array_equal(arr0(run / "samples.npz"), setup[2])


def test_kill_in_the_middle_of_writing_a_chunk_then_resume(setup, tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPM_FAST_TEST_FAULT": "0:2:kill-mid-write"}
    killed = subprocess.run([sys.executable, "-m", "ddpm_fast", *sample_args(setup, run)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600, start_new_session=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    files = sorted(os.listdir(run / "chunks"))
    assert files[1:] == ["chunk_000000.safetensors", "chunk_000001.safetensors"]  # chunk 2 never got its name
    assert files[0].startswith(".tmp_") and files[0].endswith("chunk_000002.safetensors")  # its complete temp
    assert main(sample_args(setup, run)) == 0
    printed = capsys.readouterr()
    assert "5 drawn now, 6 found on disk" in printed.out
    np.testing.assert_array_equal(arr0(run / "samples.npz"), setup[2])
    assert sorted(os.listdir(run / "chunks")) == [f"chunk_00000{k}.safetensors" for k in range(4)]
