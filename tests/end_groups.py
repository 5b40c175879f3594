"""``python tests/end_groups.py ROUNDS PORT OUT``: two processes (gloo, as on a CPU) run ROUNDS tiny
jobs under ``training.run.guard.guarded``, one process group each, ending the way the training jobs
end: a DDP model still in the job's frame when ``run.finish`` returns (round 3k), in the frame of
an exception (a stop; 3k + 1), or in a reference cycle (3k + 2), as accelerate's wrappers make
(tests/test_run_guard.py). Each process prints ``ended N`` after round N."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from training import run  # noqa: E402


class Stop(Exception):
    pass


def one_rank(rank: int, rounds: int, port: int, out: str) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0)

    @run.guarded
    def job(cfg, round_: int):
        dist.init_process_group("gloo", store=dist.PrefixStore(f"round-{round_}", store), rank=rank, world_size=2)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64))
        if round_ % 3 == 2:
            model.itself = model
        model(torch.randn(8, 64)).sum().backward()  # DDP's all-reduce of the gradients
        flags = torch.ones(2)
        dist.all_reduce(flags)  # the guard's per-step reduce: a tensor Python drops at once
        del flags
        accelerator = SimpleNamespace(is_main_process=rank == 0, wait_for_everyone=dist.barrier,
                                      end_training=dist.destroy_process_group)  # fmt: skip
        stop = SimpleNamespace(disarm=lambda: None)
        run.finish(accelerator, stop, SimpleNamespace(close=lambda: None), None, [], lambda: None)
        if round_ % 3 == 1:
            raise Stop  # the model stays in this frame, through the traceback

    for round_ in range(rounds):
        try:
            job(SimpleNamespace(output_dir=Path(out) / f"rank-{rank}"), round_=round_)
        except Stop:
            pass
        # one write of the whole line: print() writes the text and its newline apart, so the two ranks'
        # lines could interleave on the shared pipe ("ended 5ended 5"), which read as a lost round
        sys.stdout.write(f"ended {round_}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    rounds, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    mp.spawn(one_rank, args=(rounds, port, out), nprocs=2)
