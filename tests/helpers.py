"""Tiny models and data shared by the training tests (real code paths, seconds on a CPU)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import psutil  # Accelerate requires it
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback, ViTConfig, ViTImageProcessor, ViTModel

from attndistill_hf.cli import parse_config_and_flags, recipe_text, run_recipe
from attndistill_hf.config import AttnDistillConfig
from attndistill_hf.demo.fashion_mnist import DEBIAN_FASHION_MNIST_DIR
from attndistill_hf.models import build_student
from attndistill_hf.pipeline import DISTILL_ARGUMENTS, DistillResult, run_distillation


def distill_refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str]:
    """``python recipes/distill.py ARGV`` in this process: its exit status and its error line."""
    status = distill_exit_status(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    return status, lines[-1] if lines else ""


def argv_without_a_teacher(tmp_path: Path) -> list[str]:
    # The teacher does not exist: a refusal must come before anything loads or is written.
    return ["--teacher_name_or_path", str(tmp_path / "teacher"), "--output_dir", str(tmp_path / "out")]


class RecordWeights(TrainerCallback):
    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append({k: v.detach().clone() for k, v in model.state_dict().items()})


REPO = Path(__file__).resolve().parents[1]

# Real Fashion-MNIST, where the Debian package dataset-fashion-mnist is installed.
HAVE_REAL = (Path(DEBIAN_FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file()
NO_REAL_REASON = "Debian package dataset-fashion-mnist is not installed"
needs_real = pytest.mark.skipif(not HAVE_REAL, reason=NO_REAL_REASON)


def skip_without_real() -> None:
    """For fixtures, which marks do not reach: skip when real Fashion-MNIST is not installed."""
    if not HAVE_REAL:
        pytest.skip(NO_REAL_REASON)


def load_script(path: Path, name: str) -> ModuleType:
    """Execute the script at ``path`` as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is being executed
    spec.loader.exec_module(module)
    return module


def distill_command(argv: list[str]) -> DistillResult:
    """What ``python recipes/distill.py ARGV`` runs, through the library (errors raise instead of exiting)."""
    arguments = parse_config_and_flags(DISTILL_ARGUMENTS, argv)
    return run_distillation(*arguments, recipe=recipe_text(argv))


def distill_exit_status(argv: list[str]) -> int | str | None:
    """``python recipes/distill.py ARGV`` run in this process (faster than a subprocess): its exit status."""
    try:
        run_recipe(lambda: distill_command(argv))
    except SystemExit as stopped:
        return stopped.code
    return 0


def load_recipe(name: str) -> ModuleType:
    """Execute ``recipes/<name>.py`` as module ``recipe_<name>``."""
    return load_script(REPO / "recipes" / f"{name}.py", f"recipe_{name}")


# One block of width 32 on 32 px crops, patch 8: the config fields of a tiny encoder of any ViT family.
TINY_ENCODER = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}


def tiny_teacher(path: Path | None = None, *, heads: int = 4, patch: int = 4, image_size: int = 32) -> ViTModel:
    """A random ViT teacher (48 wide, 2 blocks); saved with an image processor when ``path`` is given."""
    torch.manual_seed(123)
    config = ViTConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=96,
        image_size=image_size,
        patch_size=patch,
        layer_norm_eps=1e-6,
    )
    model = ViTModel(config, add_pooling_layer=False)
    if path is not None:
        model.save_pretrained(path)
        ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return model


def tiny_student(seed: int = 0, image_size: int = 32) -> ViTModel:
    return build_student(
        "vit-tiny-patch16",
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        seed=seed,
    )


def tiny_run_config(output_dir: Path | str, **overrides: object) -> AttnDistillConfig:
    """The config of a tiny CPU run: 2 steps of 8 images at learning rate 1e-3 from seed 0, a log entry per
    step, no checkpoints, data loaded in the main process, no progress bar, no reporting.

    ``overrides`` are what a test changes (or adds); every other value stays as here.
    """
    values: dict[str, object] = {
        "per_device_train_batch_size": 8,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "seed": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "use_cpu": True,
        "disable_tqdm": True,
        "report_to": "none",
    }
    return AttnDistillConfig(output_dir=str(output_dir), **(values | overrides))


class PixelDataset(torch.utils.data.Dataset):
    """Fixed random images as ``{"pixel_values"}``: no augmentation, so runs are comparable exactly."""

    def __init__(self, size: int = 32, count: int = 32) -> None:
        generator = torch.Generator().manual_seed(7)
        self.pixels = torch.randn(count, 3, size, size, generator=generator)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index]}


def write_image_folder(root: Path, per_class: int = 6, classes: int = 3, size: int = 40, corrupt: bool = False) -> Path:
    """Class folders of PNGs whose colour depends on the class (plus an undecodable file if asked)."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = (rng.random((size, size, 3)) * 60 + label * 90).astype("uint8")
            Image.fromarray(pixels).save(folder / f"{index}.png")
    if corrupt:
        (root / "class0" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n-not-an-image")
    return root


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    """The file bytes of ``image`` saved as ``fmt`` (PNG, JPEG, ...) with PIL's save options."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def coordinate_image(size: int = 256) -> Image.Image:
    """R = x, G = y: the colours of any crop tell where it came from."""
    y, x = np.mgrid[0:size, 0:size]
    array = np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


# Appended to every two-process script: each rank leaves the process group together with the others, then exits
# at once. PyTorch's interpreter teardown after a gloo group can abort a process whose work is all done
# ("terminate called without an active exception", SIGABRT, about one run in ten of a two-rank DDP run here),
# which would fail a test over nothing it checks.
LEAVE_PROCESS_GROUP = """
import os
import sys
import torch.distributed
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def run_two_processes(script_text: str, folder: Path, timeout: float = 180) -> None:
    """Run ``script_text`` as 2 DDP ranks (torchrun, gloo on CPU) with ``folder`` as its argument.

    The script can import the library and these helpers. On a timeout, torchrun and both workers are
    killed, so nothing is left behind.
    """
    run_torchrun(script_text, folder, [["--standalone", "--nproc_per_node", "2"]], timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kill_launch(pid: int) -> None:
    """Kill the launcher ``pid`` and every process under it. torchrun starts each worker in a session of its
    own: killing the launcher's process group would leave the workers running (a hung one for ever)."""
    try:
        launcher = psutil.Process(pid)
        processes = [launcher, *launcher.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:  # the launcher first: it does not restart a worker that it no longer watches
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def run_torchrun(script_text: str, folder: Path, launchers: list[list[str]], timeout: float = 180) -> None:
    """Run ``script_text`` under one torchrun per item of ``launchers`` (that launcher's flags), all at once,
    with ``folder`` as its argument; launcher N's output goes to ``folder/launcher<N>.log``.

    As :func:`run_two_processes`, the script can import the library and these helpers. On a timeout every
    launcher and every worker is killed (:func:`kill_launch`), so that a run that hangs fails the test.
    """
    script = folder / "worker.py"
    script.write_text(script_text + LEAVE_PROCESS_GROUP)
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
    }
    started = []
    for index, flags in enumerate(launchers):
        command = [sys.executable, "-m", "torch.distributed.run", *flags, str(script), str(folder)]
        with open(folder / f"launcher{index}.log", "wb") as log:
            started.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for process in started:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for process in started:
            kill_launch(process.pid)
        for process in started:
            process.wait()
        pytest.fail(f"the torchrun launch did not finish in {timeout:g} s")
    for index, process in enumerate(started):
        output = (folder / f"launcher{index}.log").read_text(errors="replace")
        assert process.returncode == 0, f"launcher {index}:\n{output[-3000:]}"


def run_two_nodes(script_text: str, folder: Path, timeout: float = 180) -> None:
    """Run ``script_text`` on two simulated nodes of one process each: two torchrun launchers on this
    machine (``--nnodes 2 --node_rank 0/1``, gloo over the loopback), as :func:`run_torchrun` runs them."""
    port = free_port()
    nodes = [["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node)] for node in (0, 1)]
    rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    run_torchrun(script_text, folder, [[*flags, *rendezvous] for flags in nodes], timeout)
