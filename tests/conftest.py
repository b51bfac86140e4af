"""Shared fixtures: the ../shared folder, tiny generated image folders, and launching the
real entry scripts under `accelerate launch` the way a user does, fully offline."""

import contextlib
import importlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `-n auto` (setup.cfg): one pytest worker per core, so each computes on one thread, as
    # the scripts they launch do (OMP_NUM_THREADS=1 below); more threads than cores would make
    # the workers' OpenMP threads spin against each other
    torch.set_num_threads(1)
CONFIGS = os.path.join(REPO, "accelerate_configs")


@pytest.fixture(autouse=True)
def console_logging():
    """Each test starts with the scripts' console logging (INFO lines on stdout), whatever an
    earlier test in this worker left: a test that reads what a run says then passes alone
    and in any order, not only after a test that happened to set logging up."""
    from common.log import setup_logging

    setup_logging()


@pytest.fixture(scope="session")
def shared_dir():
    """../shared (or $TL_SHARED_DIR): the real ants/bees data and the lite0 weights."""
    path = os.environ.get("TL_SHARED_DIR", os.path.join(REPO, "..", "shared"))
    data = os.path.join(path, "data", "hymenoptera_data")
    weights = os.path.join(path, "weights", "tf_efficientnet_lite0.in1k.safetensors")
    if not (os.path.isdir(data) and os.path.isfile(weights)):
        pytest.skip(f"shared data/weights not found under {path} (set TL_SHARED_DIR)")
    return dict(root=path, data=data, weights=weights)


@pytest.fixture(scope="session")
def offline_env(tmp_path_factory):
    """Environment for subprocesses: no network, W&B offline, HF caches in a temp dir."""
    home = tmp_path_factory.mktemp("hf_home")
    env = dict(os.environ)
    env.update(HF_HOME=str(home), XDG_CACHE_HOME=str(home / "xdg"),  # feature cache too
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="offline", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    os.environ.setdefault("HF_HOME", str(home))  # in-process evaluate/datasets use it too
    return env


# Three colour-coded classes, so a tiny model can actually learn them.
COLOURS = {"cat": (200, 60, 60), "dog": (60, 200, 60), "fox": (60, 60, 200)}


def write_image(path, colour, size=(48, 40), seed=0, mode="RGB", fmt=None):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size[1], size[0], 3)),
                  0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_image_folder(root, counts=None, classes=("cat", "dog", "fox"), splits=("train", "val")):
    """root/<split>/<class>/<i>.jpg with counts[split] images per class (default 6 / 3)."""
    counts = counts or {"train": 6, "val": 3}
    seed = 0
    for split in splits:
        for cls in classes:
            for i in range(counts[split]):
                seed += 1
                write_image(os.path.join(root, split, cls, f"{i}.jpg"), COLOURS[cls], seed=seed)
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


def launch(script, args, env, nproc=1, timeout=600, check=True, real=False):
    """Run an entry script as `accelerate launch --config_file accelerate_configs/cpu.yaml`
    (or cpu_2proc.yaml for `nproc=2`) would, in the fast way unless the launch itself is
    what a test is about: one process calls the script's `main(argv)` here (`in_process`),
    two are forked from here as accelerate's `debug_launcher` does (`two_processes`).
    `real=True`: the real launcher in a subprocess, allowed only in tests marked `launch`
    (the CI tier), so that the README's test command stays fast."""
    if real:
        _CURRENT.require_launch_marker(f"a real launch of {script}")
        config = os.path.join(CONFIGS, "cpu.yaml" if nproc == 1 else "cpu_2proc.yaml")
        accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
        cmd = [accelerate, "launch", "--config_file", config,
               os.path.join(REPO, script), *map(str, args)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    elif nproc == 1:
        proc = in_process(script, args, env, launcher=True)
    else:
        proc = _script_on_two_processes(script, args, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def two_processes(function, *args, timeout=600):
    """`function(*args)` on 2 CPU processes forked from this one, joined by gloo: accelerate's
    `debug_launcher`, with a file rendezvous of its own (debug_launcher's fixed port 29500
    would collide between pytest workers) and a time limit. An exception in a process is
    raised here (torch's ProcessRaisedException, with its traceback)."""
    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    with tempfile.TemporaryDirectory() as tmp, patch_environment(
            world_size=2, master_addr="127.0.0.1", master_port=str(_free_port()),
            accelerate_mixed_precision="no", accelerate_use_cpu="yes",
            accelerate_debug_rdv_file=os.path.join(tmp, "rdv"), gloo_socket_ifname="lo"):
        ctx = start_processes(PrepareForLaunch(_forked, debug=True), args=(function, *args),
                              nprocs=2, start_method="fork", join=False)
        deadline = time.time() + timeout
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise AssertionError(f"2 processes of {function.__name__} still running "
                                     f"after {timeout} s")


def _forked(function, *args):
    # one thread per process, as a 2-process launch on 2 cores runs; and OpenMP's thread
    # pool, if this process's parent had started one, does not survive a fork (a parallel
    # region in the child would wait on the parent's threads forever)
    torch.set_num_threads(1)
    function(*args)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _script_rank(script, argv, env, results):
    """One of `two_processes`: the script's main(argv) with this rank's environment, its
    exit status and output written to results/<rank>.json."""
    import torch.distributed as dist

    rank = dist.get_rank()
    dist_env = {k: os.environ[k] for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                           "GLOO_SOCKET_IFNAME")}
    proc = in_process(script, argv, {**env, **dist_env, "RANK": str(rank),
                                     "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"},
                      launcher=True)
    with open(os.path.join(results, f"{rank}.json"), "w") as fh:
        json.dump(dict(rc=proc.returncode, out=proc.stdout, err=proc.stderr), fh)


def _script_on_two_processes(script, args, env, timeout):
    """A CompletedProcess as `accelerate launch` with 2 processes gives: the first non-zero
    exit status of the ranks, their stdout and stderr one after the other."""
    with tempfile.TemporaryDirectory() as results:
        two_processes(_script_rank, script, [str(a) for a in args], env, results,
                      timeout=timeout)
        ranks = [json.load(open(os.path.join(results, f"{r}.json"))) for r in (0, 1)]
    code = next((r["rc"] for r in ranks if r["rc"]), 0)
    return subprocess.CompletedProcess([script, *map(str, args)], code,
                                       "".join(r["out"] for r in ranks),
                                       "".join(r["err"] for r in ranks))


def run_script(script, args, env, cwd=REPO, timeout=300, real=False):
    """`python script args` (no launcher), for argument and error checks: in this process
    unless `real` (then a subprocess, in tests marked `launch`)."""
    if not real:
        return in_process(script, args, env, cwd=cwd)
    _CURRENT.require_launch_marker(f"python {script} in a subprocess")
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# what `accelerate launch` with accelerate_configs/cpu.yaml puts in its worker's environment
_LAUNCHER_ENV = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no",
                 "ACCELERATE_DYNAMO_BACKEND": "NO"}


def in_process(script, args, env, cwd=REPO, launcher=False):
    """`script`'s `main(argv)` called in this process with `env` as its environment and
    `cwd` as its folder; returns a CompletedProcess (exit status, stdout, stderr) as a
    subprocess would. Accelerate's process-wide state is reset before and after, so each
    call starts as a fresh process would; a `SystemExit` gives the exit status and any
    other exception exits 1 with its traceback on stderr, as Python does."""
    name = os.path.splitext(os.path.basename(script))[0]
    module = importlib.import_module(name)  # the repo root is on sys.path (setup.cfg)
    argv = [str(a) for a in args]
    saved_env, saved_cwd, saved_threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    _fresh_process_state()
    os.environ.clear()
    os.environ.update(env, **(_LAUNCHER_ENV if launcher else {}))
    if env.get("OMP_NUM_THREADS", "").isdigit():  # what a new process would take from it
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                module.main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - reported as the interpreter would
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
        os.environ.clear()
        os.environ.update(saved_env)
        _fresh_process_state()
    return subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())


def _fresh_process_state():
    """What a run leaves behind in a process that the next run must not inherit: Accelerate's
    shared state, and urllib's global opener (built once, with the proxies of the environment
    at its first use: a run tested offline through a closed proxy would keep it)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    urllib.request.install_opener(None)


class _Current:
    """The running test's markers, for `launch` to check that real launches are marked."""

    node = None

    def require_launch_marker(self, what):
        if self.node is not None and self.node.get_closest_marker("launch") is None:
            raise AssertionError(f"{what} in {self.node.nodeid}: mark the test "
                                 "@pytest.mark.launch (CI tier) or run it in process")


_CURRENT = _Current()


@pytest.fixture(autouse=True)
def _current_test(request):
    _CURRENT.node = request.node
    yield
    _CURRENT.node = None


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A 'pretrained' test_resnet file whose BatchNorm statistics are far from the defaults
    (mean 0, var 1), so any update of them during training would show."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=1000)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn_like(buf) * 0.5)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand_like(buf) + 0.5)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)
