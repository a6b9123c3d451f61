"""What the tests of both scripts share: running a function on several processes, as torchrun would."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from common import setup_distributed, shutdown_distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank, world_size, port, worker, args):
    """One worker: torchrun's environment variables, then the scripts' own set-up (gloo on the CPU)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    setup_distributed()
    try:
        worker(rank, *args)
    finally:
        shutdown_distributed()


@pytest.fixture
def run_ranks():
    """run_ranks(worker, *args) runs worker(rank, *args) on 2 processes joined in one process group."""
    def run(worker, *args, world_size=2):
        mp.spawn(_as_rank, args=(world_size, _free_port(), worker, args), nprocs=world_size)
    return run
