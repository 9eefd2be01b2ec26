"""One rank of a ``tests/cluster.py`` cluster: run the tasks it is sent, report each result or error."""

from __future__ import annotations

import faulthandler
import gc
import importlib
import os
import pickle
import signal
import traceback
from multiprocessing.connection import Client

import torch


def reset() -> None:
    """What one training run leaves behind that the next must not see."""
    from accelerate.state import AcceleratorState, GradientState

    from replay_opt.multiprocess import registry

    for rank in registry.forget_all():
        for group in (rank.transport.meta, rank.transport.stage_group):
            if group is not None:
                torch.distributed.destroy_process_group(group)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    gc.collect()


def keep_the_process_group() -> None:
    """The process group lives as long as the worker: a training run's end_training() must not destroy it
    (initialising it again in the same process can hang in gloo's rendezvous)."""
    from accelerate.state import PartialState

    PartialState.destroy_process_group = lambda self, group=None: None


def main() -> None:
    keep_the_process_group()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the cluster dumps stacks of a hung task
    torch.set_num_threads(1)
    host, port = os.environ["CLUSTER_ADDRESS"].rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ["CLUSTER_KEY"]))
    conn.send(int(os.environ["RANK"]))
    while True:
        task = conn.recv()
        if task is None:
            break
        function, kwargs = task
        module, name = function.split(":")
        try:
            result = getattr(importlib.import_module(module), name)(**kwargs)
        except BaseException:
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
            conn.close()
            os._exit(1)  # the process group is in an unknown state: the others stop too
        conn.send_bytes(pickle.dumps(("ok", result)))  # plain pickle: no shared-memory tensors
        reset()
    conn.close()


if __name__ == "__main__":
    main()
