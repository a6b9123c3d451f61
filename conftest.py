"""What the tests of both scripts share: running a function on several processes, as torchrun would,
and killing a training run with SIGKILL at a random step."""
import os
import random
import signal
import socket
import subprocess
import time

import pytest
import torch
import torch.multiprocessing as mp

import torch.distributed as dist


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank, world_size, port, worker, args):
    """One worker: torchrun's environment variables and a gloo process group, as the scripts start one."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def run_ranks():
    """run_ranks(worker, *args) runs worker(rank, *args) on 2 processes joined in one process group."""
    def run(worker, *args, world_size=2):
        mp.spawn(_as_rank, args=(world_size, _free_port(), worker, args), nprocs=world_size)
    return run


@pytest.fixture
def run_killed(tmp_path):
    """run_killed(command, checkpoint, step_of, steps) starts a training command, waits until its
    `checkpoint` holds a step drawn at random from `steps` (step_of reads it from the checkpoint), and
    sends SIGKILL a random 0-50 ms later: mid-step or mid-save, as a preemption would. Returns the
    drawn step, the step the checkpoint holds after the kill and the run's output."""
    def run(command, checkpoint, step_of, steps, env=None):
        rng = random.Random()
        target = rng.choice(list(steps))
        log_path = tmp_path / f"killed-{time.time_ns()}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen([str(part) for part in command], stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                while not (checkpoint.exists() and step_of(torch.load(checkpoint, weights_only=True)) >= target):
                    assert process.poll() is None, f"ended before step {target}: {log_path.read_text()[-2000:]}"
                    time.sleep(0.005)
                time.sleep(rng.uniform(0, 0.05))
            finally:
                process.kill()
                process.wait()
        assert process.returncode == -9, f"not killed mid-run (target step {target}): {log_path.read_text()[-2000:]}"
        return target, step_of(torch.load(checkpoint, weights_only=True)), log_path.read_text()
    return run


# The scripts without java (no PTB tokenizer, no METEOR): where a test is about something else, this saves the
# seconds a java start costs
NO_JAVA = dict(os.environ, PATH=os.path.dirname(os.sys.executable))


class Hostile:
    """Unpickling this object runs a shell command (as a downloaded .pt file could): `touch marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def expect_one_error_line():
    """expect_one_error_line(command, fragment, code=1): the command ends with exit status `code`, its stderr's
    last line is the only one starting with 'error: ' and holds `fragment`, and no traceback is printed."""
    def run(command, fragment, code=1, **kwargs):
        done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=300, **kwargs)
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        assert done.returncode == code, (done.returncode, done.stderr[-2000:])
        assert lines and lines[-1].startswith("error: ") and fragment in lines[-1], done.stderr[-2000:]
        assert sum(line.startswith("error:") for line in lines) == 1, done.stderr[-2000:]
        return done
    return run


def interrupt_after_first_save(command, last_pt):
    """Starts a training command, sends SIGINT (Ctrl-C) once `last_pt` exists; returns (exit status, stdout,
    stderr)."""
    process = subprocess.Popen([str(part) for part in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True,  # SIGINT's default action even when the suite runs in the background (&,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # nohup): not ignored
    while not last_pt.exists():
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err
