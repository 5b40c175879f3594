"""``accelerate launch --multi_gpu --num_processes 2 tests/prior_ranks.py ARGS``: ``python -m training.train_ldm ARGS``
in which each process, once the class images are made (training/stage2/prior.py), prints ``rank R drew N``: the
number of class images its own base pipeline drew (tests/test_prior.py)."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import training.stage2.prior as prior  # noqa: E402

make_class_images = prior.make_class_images


def counted(cfg, pipe, accelerator) -> None:
    drawn, cls = [], type(pipe)
    call = cls.__call__

    def counting(self, prompts, *args, **kwargs):
        drawn.append(len(prompts))
        return call(self, prompts, *args, **kwargs)

    cls.__call__ = counting
    try:
        make_class_images(cfg, pipe, accelerator)
    finally:
        cls.__call__ = call
    sys.stdout.write(f"rank {accelerator.process_index} drew {sum(drawn)}\n")  # one write: the ranks share the pipe
    sys.stdout.flush()


prior.make_class_images = counted  # open_prior calls it by this module's name
sys.argv[0] = "training.train_ldm"
runpy.run_module("training.train_ldm", run_name="__main__", alter_sys=True)
